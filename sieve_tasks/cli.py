"""The ``sieve`` command: one subcommand per stage, ``run`` for all of them, ``make-sample`` for a demo pool."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pickle import UnpicklingError

from sieve_tasks import lease, models
from sieve_tasks.settings import (EMBEDDINGS, METADATA_CLIP_COLUMNS, POPULATIONS, PROFILES, Settings, parse_external_scores,
                                  parse_weights)


def _model_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("models and inference")
    g.add_argument("--profile", choices=PROFILES, default="default",
                   help="'test' swaps captioner and CLIP for tiny random models built offline")
    g.add_argument("--captioner", default=models.DEFAULT_CAPTIONER,
                   help="BLIP: HF id, local dir, s3:// prefix, or an original BLIP checkpoint (.pth local, s3://, "
                   "https://) or preset (blip-base-14m = SIEVE's, blip-base-129m, blip-base-capfilt-large)")
    g.add_argument("--captions", help="parquet with uid + captions (list) to use instead of captioning; "
                   "'{shard}' in the path means one file per shard")
    g.add_argument("--num-captions", type=int, default=8)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--min-length", type=int, default=5, help="in tokens, prompt included (HF semantics)")
    g.add_argument("--max-length", type=int, default=20, help="in tokens, prompt included (HF semantics)")
    g.add_argument("--repetition-penalty", type=float, default=1.1)
    g.add_argument("--prompt", default="a picture of ")
    g.add_argument("--image-size", type=int, default=224)
    g.add_argument("--fast-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="our BLIP decoder (same distribution, ~2x faster on CPU) or transformers' generate")
    g.add_argument("--caption-batch-size", type=int, default=None,
                   help="images per captioning batch (default: 8 on CPU; on CUDA what fits in free GPU memory)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--max-pixels", type=int, default=Settings.max_pixels, help="refuse larger images")
    g.add_argument("--decode-workers", type=int, default=None,
                   help="threads decoding images beside the models (default: one per core)")
    g.add_argument("--caption-cache", metavar="URI",
                   help="captions reused across runs, keyed by the image's SHA-256 and the caption settings "
                   "(local or s3://); images found there are neither decoded nor captioned")
    g.add_argument("--text-encoder", default=models.DEFAULT_TEXT_ENCODER,
                   help="sentence-transformers reference (default: the packaged all-MiniLM-L6-v2)")
    g.add_argument("--clip", default=models.DEFAULT_CLIP,
                   help="open_clip NAME:PRETRAINED, a local dir, an s3:// prefix, or 'none'")
    g.add_argument("--mask-phrases", choices=["medium", "long"], default="medium")
    g.add_argument("--mask-mode", choices=["substring", "word"], default="substring")
    g.add_argument("--embed-batch-size", type=int, default=256)
    g.add_argument("--embeddings", choices=EMBEDDINGS, default=Settings.embeddings,
                   help="the vectors stored beside the scores (the scores never depend on it; none keeps only "
                        "the similarities)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    g.add_argument("--int8", action=argparse.BooleanOptionalAction, default=False,
                   help="CPU: int8 linear layers in the captioner and the sentence encoder (3-4x faster matmuls; "
                   "scores move slightly, see BENCHMARKS.md)")
    g.add_argument("--overwrite", action="store_true", help="recompute outputs that already exist")
    return p


def _metadata_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--metadata", metavar="URI",
                   help="DataComp's metadata/: dir, prefix or glob of per-uid parquet (local or s3://), joined by uid; "
                   "--clip-from-metadata and --basic-filter read their columns from it")
    p.add_argument("--clip-from-metadata", choices=sorted(METADATA_CLIP_COLUMNS),
                   help="use DataComp's precomputed clip_<b32|l14>_similarity_score (from --metadata when given, "
                   "else from the parquet beside each shard)")
    return p


def _lease_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("run lease")
    g.add_argument("--lease-owner", help="who writes the run (default: user@host:pid; Airflow passes its run id)")
    g.add_argument("--lease-ttl", type=float, default=lease.DEFAULT_TTL_SECONDS,
                   help="seconds a lease stays alive without renewal")
    return p


def _selection_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("selection")
    rule = g.add_mutually_exclusive_group()
    rule.add_argument("--fraction", type=float, help="keep this fraction of the pool (DataComp's rule; default 0.2)")
    rule.add_argument("--threshold", type=float, help="keep samples whose score is at least this")
    rule.add_argument("--thresholds-from", metavar="RUN", help="reuse the threshold of a reference run")
    g.add_argument("--score", default="sieve", help="sieve, clip, fused or an --external-score NAME")
    g.add_argument("--weights", type=parse_weights, default={"sieve": 0.5, "clip": 0.5},
                   help="fusion weights over sieve, clip and external names, summing to 1.0 (default sieve=0.5,clip=0.5)")
    g.add_argument("--external-score", dest="external_scores", action="append", metavar="NAME=URI:COLUMN",
                   help="a per-uid score table (parquet with 'uid' and COLUMN; dir, prefix or glob), usable as "
                   "--score NAME and in --weights; repeatable")
    g.add_argument("--population", choices=POPULATIONS, default="scored",
                   help="N of the fraction rule: unique scored samples, or every uid holding the score in its "
                   "table (DataComp's baselines; such uids can be kept though their image failed)")
    g.add_argument("--basic-filter", action="store_true", help="also apply DataComp's basic filter")
    return p


def _health_options() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("health verdict")
    g.add_argument("--health-rules", type=_health_rules, default=None, metavar="JSON",
                   help="limits of the health rules as JSON, e.g. '{\"failure_rate_failed\": 0.2}' (README: "
                   "Health verdict); a failed verdict exits with status 3")
    return p


def _health_rules(text: str):
    from sieve_tasks.report.health import HealthRules

    try:
        return HealthRules.from_mapping(json.loads(text))
    except (ValueError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise argparse.ArgumentTypeError(f"not a JSON object of known rule limits: {exc}") from None


def settings_from_args(args: argparse.Namespace) -> Settings:
    fields = Settings.__dataclass_fields__
    options = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if "external_scores" in options:
        options["external_scores"] = parse_external_scores(options["external_scores"])
    return Settings(**options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sieve", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    model_opts, selection_opts, lease_opts = _model_options(), _selection_options(), _lease_options()
    health_opts = _health_options()
    metadata_opts = _metadata_options()
    io_help = "INPUT: shard directory/prefix, glob or brace list (local or s3://); RUN: run directory"

    run = sub.add_parser("run", parents=[model_opts, metadata_opts, selection_opts, lease_opts, health_opts],
                         help="all stages in one process")
    run.add_argument("input")
    run.add_argument("run")
    run.add_argument("--no-progress", action="store_true")
    for name, help_text in (("caption", "write captions per shard"), ("embed", "sentence and CLIP embeddings"),
                            ("score", "per-sample scores and basic-filter features")):
        stage = sub.add_parser(name, parents=[model_opts, metadata_opts, lease_opts], help=help_text, description=io_help)
        stage.add_argument("input")
        stage.add_argument("run")
        stage.add_argument("--shards", type=lambda s: [x for x in s.split(",") if x],
                           help="comma-separated shard ids (default: all)")
    agg = sub.add_parser("aggregate", parents=[selection_opts, metadata_opts, lease_opts], help="DuckDB thresholds over all scores")
    agg.add_argument("run")
    agg.add_argument("--overwrite", action="store_true")
    pub = sub.add_parser("publish", parents=[lease_opts, health_opts],
                         help="write RUN/manifest (subset.npy, kept.parquet, summary.json, report.html)")
    pub.add_argument("run")
    cache = sub.add_parser("cache", help="upkeep of a --caption-cache").add_subparsers(dest="cache_command",
                                                                                       required=True)
    for name, help_text in (("compact", "merge small files, fold hit logs into last-used times"),
                            ("prune", "compact, and drop entries not used for --days days"),
                            ("stats", "entries, files, bytes and hit rate per settings fingerprint")):
        command = cache.add_parser(name, help=help_text)
        command.add_argument("cache", metavar="URI")
        if name == "prune":
            command.add_argument("--days", type=float, required=True, help="keep entries used within this many days")
    report = sub.add_parser("report", parents=[lease_opts],
                            help="write RUN/manifest/report.html again from a published run")
    report.add_argument("run")
    sample = sub.add_parser("make-sample", help="write a small demo pool of real photos")
    sample.add_argument("out")
    sample.add_argument("--shards", type=int, default=2)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError, UnpicklingError) as exc:
        print(f"sieve {args.command}: error: {_one_line(exc)}", file=sys.stderr)
        return 2


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, UnpicklingError):  # torch's explanation runs to a page; the cause fits in one line
        return "refused to load a checkpoint that holds pickled objects (only plain tensors are loaded: weights_only)"
    return str(exc)


def _dispatch(args: argparse.Namespace) -> int:
    from sieve_tasks.sample_pool import make_sample_pool

    if args.command == "make-sample":
        for uri in make_sample_pool(args.out, args.shards):
            print(uri)
        return 0
    if args.command == "cache":
        from sieve_tasks import cache_admin

        if args.cache_command == "stats":
            result = cache_admin.stats(args.cache)
        else:
            result = cache_admin.compact(args.cache, args.days if args.cache_command == "prune" else None)
        print(json.dumps(result, indent=2))
        return 0
    # a shared owner (--lease-owner, e.g. an Airflow run) keeps the lease until publish (which `run` ends with), or
    # until it expires
    shared = args.lease_owner is not None and args.command not in ("publish", "run")
    with lease.hold(args.run, args.lease_owner, args.lease_ttl, release_at_end=not shared):
        return _dispatch_run_command(args)


def _dispatch_run_command(args: argparse.Namespace) -> int:
    from sieve_tasks import runner
    from sieve_tasks.stages.aggregate import aggregate
    from sieve_tasks.stages.publish import TEST_PROFILE_WARNING, publish

    if args.command == "publish":
        return _report(publish(args.run, args.health_rules))
    if args.command == "report":
        from sieve_tasks.report import RunReport

        uri, size = RunReport.load(args.run).write()
        print(f"{uri} ({size / 1e6:.2f} MB)")
        return 0
    settings = settings_from_args(args)
    if settings.profile == "test":
        print(TEST_PROFILE_WARNING, file=sys.stderr)
    if args.command in ("run", "caption", "embed"):  # a model that cannot load fails now, not after hours of work
        models.require_available(settings.required_models(("caption", "embed") if args.command == "run"
                                                          else (args.command,)))
    if args.command == "aggregate":
        print(json.dumps(aggregate(args.run, settings)["selection"], indent=2))
    elif args.command == "run":
        return _report(runner.run_all(args.input, args.run, settings, progress=not args.no_progress,
                                      rules=args.health_rules))
    else:
        for marker in runner.run_shard_stage(args.command, args.input, args.run, settings, args.shards, progress=True):
            state = "skipped (complete)" if marker["skipped"] else f"{marker['seconds']}s"
            print(f"{args.command} {marker['shard']}: {marker['ok']} ok, {marker['failed']} failed, {state}")
    return 0


def _report(summary: dict) -> int:
    """Print the outcome; the exit status is 3 when the health verdict is failed."""
    counts = summary["counts"]
    print(f"read {counts['read']}  scored {counts['scored']}  failed {counts['failed']}  "
          f"duplicates {counts['duplicates']}  kept {counts['kept']}  (threshold {summary['thresholds']['threshold']:.6g})")
    if counts["expected"] is None:
        print(f"  expected: unknown for {counts['expected_unknown_shards']} shards (no sidecar parquet or _stats.json)")
    elif counts["expected"] != counts["read"]:
        print(f"  expected {counts['expected']} samples by the shards' sidecars, read {counts['read']}")
    for reason, count in summary["failed_by_reason"].items():
        print(f"  failed: {reason}: {count}")
    for name, uri in summary["manifest"].items():
        print(f"{name}: {uri}")
    if summary["warning"]:
        print(summary["warning"], file=sys.stderr)
    health = summary["health"]
    print(f"health: {health['verdict']}")
    for finding in health["findings"]:
        if finding["level"] != "healthy":
            print(f"  {finding['level']}: {finding['rule']}: {finding['message']}", file=sys.stderr)
    return 3 if health["verdict"] == "failed" else 0


if __name__ == "__main__":
    sys.exit(main())
