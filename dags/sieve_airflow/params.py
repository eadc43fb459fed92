"""The trigger-form Params shared by the SIEVE DAGs (validated by Airflow with JSON Schema).

Defaults mirror ``sieve_tasks.settings.Settings`` and ``sieve_tasks.models`` (a test keeps them equal);
they are literals here so parsing a DAG file never imports torch.
"""

from __future__ import annotations

import sys

from airflow.sdk import Param

DEFAULT_CAPTIONER = "Salesforce/blip-image-captioning-base"
DEFAULT_TEXT_ENCODER = "sentence-transformers/all-MiniLM-L6-v2"
DEFAULT_CLIP = "ViT-B-32:openai"
DEFAULT_WEIGHTS = {"sieve": 0.5, "clip": 0.5}

_OPTIONAL_NUMBER = ["null", "number"]
# Finite numbers only. JSON Schema's bounds fail a value only when a comparison says so, and every comparison
# with NaN is false, so NaN passes all of them: ask for "x > 0 or x <= 0" instead, which NaN is not. The float
# range refuses ±inf. (A NaN that got past the form would reach the tasks as null, i.e. the default.)
_FINITE = {"minimum": -sys.float_info.max, "maximum": sys.float_info.max,
           "anyOf": [{"type": "null"}, {"not": {"maximum": 0}}, {"not": {"exclusiveMinimum": 0}}]}
_FINITE_ANY_OF = {"anyOf": _FINITE["anyOf"]}
_OPTIONAL_STRING = ["null", "string"]
_SCORE_NAME = "^[a-z][a-z0-9_]{0,31}$"  # sieve, clip, fused or an external score's name (as Settings checks)
_WEIGHT = {"type": "number", "minimum": 0, "maximum": 1, **_FINITE_ANY_OF}


def selection_params(*, section: str = "Selection") -> dict[str, Param]:
    return {
        "fraction": Param(None, type=_OPTIONAL_NUMBER, exclusiveMinimum=0, maximum=1, **_FINITE_ANY_OF,
                          section=section,
                          title="Keep fraction",
                          description="Keep this fraction of the pool (DataComp's rule). Give at most one of "
                                      "fraction, threshold, thresholds_from; none of them means 0.2."),
        "threshold": Param(None, type=_OPTIONAL_NUMBER, **_FINITE, section=section, title="Score threshold",
                           description="Keep samples whose selection score is at least this."),
        "thresholds_from": Param(None, type=_OPTIONAL_STRING, section=section, title="Reference run",
                                 description="Reuse the threshold of this earlier run directory (local or s3://)."),
        "score": Param("sieve", type="string", pattern=_SCORE_NAME, examples=["sieve", "clip", "fused"],
                       section=section, title="Score",
                       description="sieve: alt-text vs generated captions; clip: CLIP image-text; fused: "
                                   "weighted sum of min-max normalised scores; or the name of an external score."),
        "weights": Param(dict(DEFAULT_WEIGHTS), type="object", section=section, title="Fusion weights",
                         properties={"sieve": _WEIGHT, "clip": _WEIGHT}, additionalProperties=_WEIGHT,
                         propertyNames={"pattern": _SCORE_NAME}, minProperties=1,
                         description="Used by score=fused: sieve, clip and external score names; must sum to 1."),
        "external_scores": Param({}, type="object", section=section, title="External scores",
                                 propertyNames={"pattern": _SCORE_NAME},
                                 additionalProperties={"type": "string", "pattern": "^.+:[^:/]+$"},
                                 description="NAME → URI:COLUMN of a per-uid parquet table (uid + COLUMN; a file, "
                                             "dir/prefix or glob), e.g. a published FLYT/DFN score; NAME is usable "
                                             "as score and in weights."),
        "metadata": Param(None, type=_OPTIONAL_STRING, minLength=1, section=section, title="DataComp metadata",
                          description="DataComp's metadata/ (dir, prefix or glob of per-uid parquet, local or "
                                      "s3://), joined by uid; clip_from_metadata and basic_filter read it."),
        "clip_from_metadata": Param(None, type=_OPTIONAL_STRING, enum=[None, "b32", "l14"], section=section,
                                    title="CLIP score from metadata",
                                    description="Use DataComp's clip_<b32|l14>_similarity_score (from metadata "
                                                "when given, else from the parquet beside each shard)."),
        "population": Param("scored", enum=["scored", "metadata"], section=section, title="Population (N)",
                            description="scored: N = unique scored samples; metadata: N = every uid holding the "
                                        "score in its table, as DataComp's baselines count (such uids can be "
                                        "kept though their image failed)."),
        "basic_filter": Param(False, type="boolean", section=section, title="DataComp basic filter",
                              description="Also require DataComp's basic filter (English, length, size)."),
    }


def model_params(*, section: str = "Models") -> dict[str, Param]:
    return {
        "profile": Param("default", enum=["default", "test"], section=section, title="Profile",
                         description="'test' swaps captioner and CLIP for tiny random offline models."),
        "captioner": Param(DEFAULT_CAPTIONER, type="string", minLength=1, section=section, title="Captioner",
                           description="BLIP: Hugging Face id, local directory, s3:// prefix, or an original BLIP "
                           "checkpoint (.pth, local/s3/https) or preset: blip-base-14m (SIEVE's), blip-base-129m, "
                           "blip-base-capfilt-large."),
        "text_encoder": Param(DEFAULT_TEXT_ENCODER, type="string", minLength=1, section=section,
                              title="Text encoder", description="sentence-transformers reference."),
        "clip": Param(DEFAULT_CLIP, type="string", minLength=1, section=section, title="CLIP",
                      description="open_clip NAME:PRETRAINED, a local dir, an s3:// prefix, or 'none'."),
        "num_captions": Param(8, type="integer", minimum=1, maximum=64, section=section,
                              title="Captions per image"),
        "caption_batch_size": Param(None, type=["null", "integer"], minimum=1, maximum=4096, section=section,
                                    title="Caption batch size", description="Images per captioning batch. Empty: 8 "
                                    "on CPU, on a GPU what fits in its free memory (captions are reproducible for "
                                    "a given batch size)."),
        "embeddings": Param("fp16", enum=["fp32", "fp16", "none"], section=section, title="Stored embeddings",
                            description="The vectors stored beside the scores (the scores never depend on it)."),
        "int8": Param(False, type="boolean", section=section, title="int8 on CPU",
                      description="int8 linear layers in captioner and sentence encoder: faster on CPU, "
                      "scores move slightly. Local mode only (GPU pods refuse it)."),
        "caption_cache": Param(None, type=["null", "string"], section=section, title="Caption cache",
                               description="Captions reused across runs by image content (local or s3://); "
                                           "images found there are not captioned again. Empty: none (the "
                                           "refilter DAG then uses the Variable sieve_caption_cache)."),
        "overwrite": Param(False, type="boolean", section=section, title="Overwrite",
                           description="Recompute outputs that already exist (normally finished shards are skipped)."),
    }


def execution_params(*, section: str = "Execution") -> dict[str, Param]:
    return {
        "mode": Param("local", enum=["local", "kubernetes"], section=section, title="Execution mode",
                      description="local: stages run on the Airflow worker; kubernetes: caption and embed run "
                                  "as GPU pods (Variable sieve_kubernetes configures them)."),
        "aws_conn_id": Param(None, type=["null", "string"], section=section, title="Object-store connection",
                             description="Airflow AWS connection for s3:// inputs and runs (login/password = keys, "
                                         "extra endpoint_url / region_name); empty: the standard AWS environment."),
        "health_rules": Param({}, type="object", section=section, title="Health rules",
                              description="Limits of the publish-time health rules, over the Variable "
                                          "sieve_health_rules (README: Health verdict), e.g. "
                                          "{\"failure_rate_failed\": 0.2}. A failed verdict fails publish."),
        "shards_per_task": Param(1, type="integer", minimum=1, section=section, title="Shards per task",
                                 description="Shards per mapped task / pod; enlarged automatically when the pool "
                                             "has more batches than core.max_map_length."),
    }
