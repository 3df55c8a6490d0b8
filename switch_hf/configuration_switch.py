"""Configuration of the Switch model: a BERT backbone followed by Switch (mixture-of-experts) layers.

The backbone's own configuration is nested under `backbone_config`; the Switch layers share its hidden size and
vocabulary. Every field is validated when the config is built, whichever way it is built (the constructor,
`from_dict`, `from_pretrained` with keyword overrides, `AutoConfig`), and again by `validate()`, which
`save_pretrained` runs: a bad value raises `ValueError` naming the field.
"""

import dataclasses
import math

from transformers import AutoConfig, BertConfig, PreTrainedConfig
from transformers.activations import ACT2FN
from transformers.configuration_utils import SubConfigSpec
from transformers.models.auto.configuration_auto import CONFIG_MAPPING


ROUTER_DTYPES = ("float32", "bfloat16", "float16")
# Who chooses: every token its top-k experts (Switch, GShard), or every expert its top-capacity tokens (Zhou et al.,
# 2022, "Mixture-of-Experts with Expert Choice Routing").
ROUTER_TYPES = ("token_choice", "expert_choice")
# What each Switch layer routes: its feed-forward sublayer (the Switch paper), its attention (mixture of attention
# heads), both, or nothing (a dense layer: the twin that a sparse layer is measured against). A pattern spells one
# letter per layer.
EXPERT_KINDS = ("feed_forward", "attention", "both", "dense")
EXPERT_KIND_LETTERS = {"f": "feed_forward", "a": "attention", "b": "both", "d": "dense"}


class SwitchConfig(PreTrainedConfig):
    r"""
    Configuration of [`SwitchModel`] and [`SwitchForTokenReconstruction`].

    Args:
        backbone_config (`BertConfig` or `dict`, *optional*):
            The BERT backbone whose embeddings feed the Switch layers (a dict must hold `"model_type": "bert"`, as
            `BertConfig.to_dict()` does). Its `hidden_size`, `vocab_size` and `max_position_embeddings` are the
            model's. Defaults to bert-base-uncased's shape. With `num_hidden_layers=0` the backbone is BERT's
            embeddings only (its encoder is empty): a model trained from scratch whose every transformer layer is a
            Switch layer.
        freeze_backbone (`bool`, defaults to `False`):
            Keep the backbone's weights fixed (and in eval mode) while training.
        num_switch_layers (`int`, defaults to 2):
            Number of Switch layers stacked on the backbone.
        num_attention_heads (`int`, defaults to 12):
            Attention heads of each Switch layer; must divide the hidden size.
        hidden_dropout_prob (`float`, defaults to 0.1):
            Dropout on the attention and MoE outputs before each residual add.
        attention_dropout (`float`, defaults to 0.0):
            Dropout on the attention probabilities.
        layer_norm_eps (`float`, defaults to 1e-12):
            Epsilon of the Switch layers' LayerNorms (BERT's value).
        expert_kinds (`list[str]` or `str`, *optional*):
            What each Switch layer routes among experts, one entry per layer: `"feed_forward"` (a Switch MoE
            feed-forward block after dense attention, as in the Switch paper), `"attention"` (attention experts, see
            [`SwitchAttentionExperts`], followed by a dense feed-forward block), `"both"`, or `"dense"` (dense
            attention and one dense feed-forward block of an expert's size, no router: the dense twin of a
            `"feed_forward"` layer, with the same active parameters per token). A string is a pattern with one letter
            per layer: `"f"`, `"a"`, `"b"` or `"d"`, e.g. `"dfdf"` for the Switch paper's layout (every other
            feed-forward block sparse). Stored as the list of names. Defaults to `"feed_forward"` for every layer.
        num_experts (`int`, defaults to 8):
            Number of experts of each router.
        expert_intermediate_size (`int`, *optional*):
            Inner size of each expert's feed-forward network. Defaults to the backbone's `intermediate_size`, so that
            experts can be upcycled from the backbone's own feed-forward weights.
        expert_hidden_act (`str`, defaults to `"gelu"`):
            Activation inside the experts (a key of `transformers.activations.ACT2FN`).
        expert_dropout (`float`, defaults to 0.0):
            Dropout on the experts' inner activations (the Switch paper's "expert dropout", used when fine-tuning).
        router_type (`str`, defaults to `"token_choice"`):
            `"token_choice"`: every token picks its top-k experts, and an expert over capacity drops the extra tokens
            (the Switch Transformer). `"expert_choice"`: every expert picks the `capacity` tokens that score it
            highest (softmax over experts per token, then top-`capacity` over the tokens of the batch; Zhou et al.,
            2022), so no expert overflows and a token gets zero, one or several experts, its output being their
            gate-weighted sum. Expert choice sees every token of the batch at once: it suits an encoder, not
            left-to-right decoding.
        top_k (`int`, defaults to 1):
            Experts per token. 1 is the Switch Transformer; larger values give GShard/ST-MoE style top-k routing. With
            expert choice, the average number of experts per token (it scales the capacity).
        capacity_factor_train (`float` or `None`, defaults to 1.25):
            Expert capacity while training, as a multiple of the even share `top_k * tokens / num_experts`.
            Tokens over capacity are dropped and pass through the residual unchanged. `None` drops no token. With
            expert choice, each expert takes exactly `ceil(capacity_factor * top_k * tokens / num_experts)` tokens
            (at most all of them), so a token gets `capacity_factor * top_k` experts on average; `None` is refused
            there (an expert taking every token is a dense layer of all the experts).
        capacity_factor_eval (`float` or `None`, defaults to 2.0):
            The same in eval mode. `None` drops no token (dropless routing). With expert choice, the factor sets how
            many experts a token gets, so evaluate at the training factor to compute what the model was trained to.
        router_jitter_noise (`float`, defaults to 0.01):
            Multiplicative noise, uniform in `[1 - eps, 1 + eps]`, on the router's input while training only.
        router_dtype (`str`, defaults to `"float32"`):
            Dtype of the router computation, whatever the model's dtype.
        router_bias_update_rate (`float`, defaults to 0.0):
            Auxiliary-loss-free load balancing (Wang et al., 2024; DeepSeek-V3), with token choice: each router keeps
            a per-expert bias, added to the routing scores for the choice of experts only (never to the gate value),
            and [`SwitchPreTrainedModel.update_router_biases`], called after each optimizer step, moves it by this
            rate times `sign(mean load - expert load)` over the tokens routed since its last call. 0.0 turns it off;
            `router_aux_loss_coef` can then be 0.
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the load-balancing loss in the training loss. No effect with expert choice, whose load is
            balanced by construction: its load-balancing loss is 0 (the z-loss still applies).
        router_z_loss_coef (`float`, defaults to 0.001):
            Weight of the router z-loss in the training loss.
        output_router_logits (`bool`, defaults to `False`):
            Return each layer's router logits and the auxiliary losses by default.
        tie_word_embeddings (`bool`, defaults to `True`):
            Tie the vocabulary head to the backbone's word embeddings.
        initializer_range (`float`, defaults to 0.02):
            Standard deviation of the normal initialiser of new weights (BERT's value).
    """

    model_type = "switch"
    sub_configs_defaults = {"backbone_config": SubConfigSpec(config_class=AutoConfig, model_type="bert")}
    # Expert parallelism: transformers' engine shards the stacked expert weights along the expert dimension and
    # wraps the experts module with its all-to-all token dispatch.
    base_model_ep_plan = {
        "layers.*.moe.experts.up_proj": "grouped_gemm",
        "layers.*.moe.experts.up_proj_bias": "grouped_gemm",
        "layers.*.moe.experts.down_proj": "grouped_gemm",
        "layers.*.moe.experts.down_proj_bias": "grouped_gemm",
        "layers.*.moe.experts": "ep_dispatch_experts",
    }
    # FSDP2 (`DistributedConfig(fsdp_size=...)`): each Switch layer is gathered for its own forward and backward and
    # freed after (its experts, under expert parallelism, are sharded on their own mesh); the backbone's layers are
    # named on the backbone's config, below. Everything else, the tied embeddings and head included, stays in the
    # root group, which is kept gathered for the whole step.
    base_model_fsdp_plan = {"layers.*": "free_full_weight", "norm": "keep_full_weight"}

    # --- backbone ---
    backbone_config: dict | PreTrainedConfig | None = None
    freeze_backbone: bool = False

    # --- Switch layers ---
    num_switch_layers: int = 2
    num_attention_heads: int = 12
    hidden_dropout_prob: float = 0.1
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-12

    # --- experts ---
    expert_kinds: list[str] | str | None = None
    num_experts: int = 8
    expert_intermediate_size: int | None = None
    expert_hidden_act: str = "gelu"
    # Fedus et al. (2021), section 2.4: a higher dropout inside the experts only helps fine-tuning; off by default.
    expert_dropout: float = 0.0

    # --- router ---
    router_type: str = "token_choice"
    top_k: int = 1
    # Fedus et al. (2021) train at 1.0-1.25 and evaluate at 2.0: evaluation must not drop tokens to look good.
    capacity_factor_train: float | None = 1.25
    capacity_factor_eval: float | None = 2.0
    # Fedus et al. (2021), table 3: multiplicative input jitter of 1e-2 stabilises training.
    router_jitter_noise: float = 0.01
    # Fedus et al. (2021), "selective precision": the router's softmax is unstable in bfloat16.
    router_dtype: str = "float32"
    # Off: the Switch paper balances with the auxiliary loss. Wang et al. (2024) use 1e-3 with sigmoid scores.
    router_bias_update_rate: float = 0.0

    # --- losses ---
    # Fedus et al. (2021) use alpha = 1e-2; Zoph et al. (2022, ST-MoE) use a z-loss weight of 1e-3.
    router_aux_loss_coef: float = 0.01
    router_z_loss_coef: float = 0.001
    output_router_logits: bool = False

    # --- head and initialisation ---
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self._check_backbone_input()
        super().__post_init__(**kwargs)
        if not isinstance(self.backbone_config, BertConfig):
            raise ValueError(
                f"backbone_config must describe a BERT model (model_type 'bert'), got "
                f"{type(self.backbone_config).__name__} with model_type {self.backbone_config.model_type!r}"
            )
        if self.expert_intermediate_size is None:
            self.expert_intermediate_size = self.backbone_config.intermediate_size
        # BertConfig inherits transformers' default FSDP plan, written for decoder layouts (`embed_tokens`,
        # `layers.*`, `norm`) that BertModel does not have: name BERT's own layers instead. Not serialised.
        self.backbone_config.base_model_fsdp_plan = {"encoder.layer.*": "free_full_weight"}
        self._check_fields()
        self.expert_kinds = self._expand_expert_kinds()

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """Builds the config from `config_dict`, with the keyword arguments that name Switch fields applied as if they
        were in it: checked, and expanded (an `expert_kinds` letter pattern) like constructor arguments.

        transformers' `from_dict` sets keyword overrides on the config after building it, past the constructor's
        checks; `from_pretrained` (the config's, `AutoConfig`'s and the models' own) passes its overrides here. Other
        overrides (transformers' own fields, `backbone_config` updates) still go that way, so the whole config is
        validated again at the end.
        """
        overrides = {name: kwargs.pop(name) for name in list(kwargs) if name in cls._switch_fields()}
        loaded = super().from_dict({**config_dict, **overrides}, **kwargs)
        config = loaded[0] if isinstance(loaded, tuple) else loaded  # (config, unused kwargs) with return_unused_kwargs
        config.validate()
        return loaded

    @classmethod
    def _switch_fields(cls) -> set[str]:
        """The fields this class adds to transformers' `PreTrainedConfig`, but the nested backbone config (a dict
        override of it updates the loaded one field by field, as transformers does)."""
        inherited = {field.name for field in dataclasses.fields(PreTrainedConfig)}
        return {field.name for field in dataclasses.fields(cls)} - inherited - {"backbone_config"}

    def validate(self):
        """Checks every field again (transformers' own checks first): `save_pretrained` calls this, so that a config
        whose attributes were set to bad values after it was built is not written."""
        super().validate()
        self._check_fields()
        self._expand_expert_kinds()

    def _check_backbone_input(self):
        """`backbone_config` must be a config, None (the default BERT), or a dict naming a model type transformers
        knows; transformers would fail on any other dict with a bare KeyError."""
        backbone = self.backbone_config
        if backbone is None or isinstance(backbone, PreTrainedConfig):
            return
        expected = "a BertConfig, None, or a dict with model_type 'bert' (as BertConfig.to_dict() gives)"
        if not isinstance(backbone, dict):
            raise ValueError(f"SwitchConfig.backbone_config must be {expected}, got a {type(backbone).__name__}")
        if "model_type" not in backbone:
            raise ValueError(
                f"SwitchConfig.backbone_config must be {expected}, got a dict without model_type (keys "
                f"{sorted(backbone)})"
            )
        if backbone["model_type"] not in CONFIG_MAPPING:
            raise ValueError(
                f"SwitchConfig.backbone_config must be {expected}, got model_type {backbone['model_type']!r}"
            )

    # The Switch layers share the backbone's hidden size, vocabulary, positions and padding id: these read and write
    # the backbone's config, so that `resize_token_embeddings` and other code that sets them keep the two in step.
    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size

    @hidden_size.setter
    def hidden_size(self, value: int):
        self.backbone_config.hidden_size = value

    @property
    def vocab_size(self) -> int:
        return self.backbone_config.vocab_size

    @vocab_size.setter
    def vocab_size(self, value: int):
        self.backbone_config.vocab_size = value

    @property
    def max_position_embeddings(self) -> int:
        return self.backbone_config.max_position_embeddings

    @max_position_embeddings.setter
    def max_position_embeddings(self, value: int):
        self.backbone_config.max_position_embeddings = value

    @property
    def pad_token_id(self) -> int | None:
        return self.backbone_config.pad_token_id

    @pad_token_id.setter
    def pad_token_id(self, value: int | None):
        self.backbone_config.pad_token_id = value

    @property
    def num_hidden_layers(self) -> int:
        return self.num_switch_layers

    @property
    def router_names(self) -> list[str]:
        """One name per router, in the order the model runs them and reports their routing (`tokens_per_expert`,
        `dropped_fraction`, `expert_indices`): e.g. `["layer 0 feed_forward", "layer 1 attention", ...]`. A "both"
        layer runs its attention router, then its feed-forward router; a "dense" layer has none."""
        names = []
        for index, kind in enumerate(self.expert_kinds):
            routed = {"both": ["attention", "feed_forward"], "dense": []}.get(kind, [kind])
            names.extend(f"layer {index} {sublayer}" for sublayer in routed)
        return names

    def _expand_expert_kinds(self) -> list[str]:
        """`expert_kinds` as one name per layer, from a list, a letter pattern, or None (all feed-forward)."""
        kinds = self.expert_kinds
        if kinds is None:
            return ["feed_forward"] * self.num_switch_layers
        if isinstance(kinds, str):
            unknown = sorted(set(kinds) - set(EXPERT_KIND_LETTERS))
            if unknown:
                raise ValueError(
                    f"SwitchConfig.expert_kinds pattern {kinds!r} has unknown letters {unknown}; use one letter per "
                    f"layer from {EXPERT_KIND_LETTERS}"
                )
            kinds = [EXPERT_KIND_LETTERS[letter] for letter in kinds]
        elif not isinstance(kinds, (list, tuple)) or not all(isinstance(kind, str) for kind in kinds):
            raise ValueError(
                f"SwitchConfig.expert_kinds must be a list of names from {list(EXPERT_KINDS)} or a letter pattern, "
                f"got {kinds!r}"
            )
        unknown = sorted(set(kinds) - set(EXPERT_KINDS))
        if unknown:
            raise ValueError(f"SwitchConfig.expert_kinds names unknown kinds {unknown}; expected {list(EXPERT_KINDS)}")
        if len(kinds) != self.num_switch_layers:
            raise ValueError(
                f"SwitchConfig.expert_kinds has {len(kinds)} entries ({self.expert_kinds!r}) but num_switch_layers "
                f"is {self.num_switch_layers}; give one kind per Switch layer"
            )
        return list(kinds)

    def _check_fields(self):
        def fail(field, value, expected):
            raise ValueError(f"SwitchConfig.{field} must be {expected}, got {value!r}")

        def is_number(value) -> bool:
            # bool is an int to Python, not a number to a user; NaN fails no comparison and infinity no lower bound.
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

        def check_int(field, minimum):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                fail(field, value, f"an integer >= {minimum}")

        def check_probability(field):
            value = getattr(self, field)
            if not is_number(value) or not 0.0 <= value < 1.0:
                fail(field, value, "a number in [0, 1)")

        def check_non_negative(field):
            value = getattr(self, field)
            if not is_number(value) or value < 0:
                fail(field, value, "a finite number >= 0")

        for field in ("num_switch_layers", "num_attention_heads", "num_experts", "expert_intermediate_size", "top_k"):
            check_int(field, minimum=1)
        if self.top_k > self.num_experts:
            fail("top_k", self.top_k, f"<= num_experts ({self.num_experts})")
        if self.hidden_size % self.num_attention_heads != 0:
            fail(
                "num_attention_heads",
                self.num_attention_heads,
                f"a divisor of the backbone's hidden_size ({self.hidden_size})",
            )
        for field in ("capacity_factor_train", "capacity_factor_eval"):
            value = getattr(self, field)
            if value is not None and (not is_number(value) or value <= 0):
                fail(field, value, "a finite number > 0, or None for dropless routing")
        for field in ("hidden_dropout_prob", "attention_dropout", "expert_dropout", "router_jitter_noise"):
            check_probability(field)
        for field in ("router_aux_loss_coef", "router_z_loss_coef", "router_bias_update_rate", "initializer_range"):
            check_non_negative(field)
        if not is_number(self.layer_norm_eps) or self.layer_norm_eps <= 0:
            fail("layer_norm_eps", self.layer_norm_eps, "a finite number > 0")
        if self.expert_hidden_act not in ACT2FN:
            fail("expert_hidden_act", self.expert_hidden_act, f"one of {sorted(ACT2FN)}")
        if self.router_dtype not in ROUTER_DTYPES:
            fail("router_dtype", self.router_dtype, f"one of {list(ROUTER_DTYPES)}")
        if self.router_type not in ROUTER_TYPES:
            fail("router_type", self.router_type, f"one of {list(ROUTER_TYPES)}")
        if self.router_type == "expert_choice":
            for field in ("capacity_factor_train", "capacity_factor_eval"):
                if getattr(self, field) is None:
                    fail(field, None, "a number > 0 with router_type 'expert_choice' (each expert takes that many "
                         "times its even share of tokens; None would have every expert take every token)")
            if self.router_bias_update_rate > 0:
                fail("router_bias_update_rate", self.router_bias_update_rate,
                     "0.0 with router_type 'expert_choice' (its experts take equal loads by construction)")
        for field in ("freeze_backbone", "tie_word_embeddings", "output_router_logits"):
            if not isinstance(getattr(self, field), bool):
                fail(field, getattr(self, field), "True or False")


__all__ = ["SwitchConfig"]
