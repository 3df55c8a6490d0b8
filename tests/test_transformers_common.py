"""transformers' own model tests (`ModelTesterMixin`, `ConfigTester`) run against the Switch models.

transformers checks every model it ships with these two; running them here holds `SwitchModel` and
`SwitchForTokenReconstruction` to the same contract (save/load, initialisation, tied weights, resizing, gradient
checkpointing, output flags, attention dispatch, dtypes, ...). The test files come from PyPI for the installed
transformers version, see `transformers_common_tests.py`; a failed download fails every test here with pip's message.
Tests that need an accelerator, a multi-GPU machine, Flash Attention or DeepSpeed skip themselves here, with the
mixin's own reasons.

The tester follows transformers' `BertModelTester`: tiny configs and inputs, one test class per kind of experts
(feed-forward, attention, both), each covering both models. A test the mixin cannot apply to these models is
overridden with a skip that says why; the one real difference from a dense model, routing statistics taken over the
whole batch, is handled where it matters (`test_batching_equivalence`).
"""

import json
import unittest
import warnings
from collections import OrderedDict
from contextlib import ExitStack, contextmanager
from unittest import mock

import huggingface_hub
import pytest
import torch
from transformers import BertConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING, MODEL_MAPPING

from switch_hf import SwitchConfig, SwitchForTokenReconstruction, SwitchModel, SwitchPreTrainedModel

import transformers_common_tests

try:
    with warnings.catch_warnings():
        # Marks that transformers' own conftest.py registers (flash_attn_test, torch_compile_test, ...) to select
        # tests in its CI; that conftest is not in the sdist, and the marks mean nothing here.
        warnings.simplefilter("ignore", pytest.PytestUnknownMarkWarning)
        COMMON = transformers_common_tests.load()
    UNAVAILABLE = None
except transformers_common_tests.CommonTestsUnavailable as error:
    COMMON, UNAVAILABLE = None, str(error)


class _CommonTestsUnavailable:
    """In place of the mixin when the download failed: every test of the classes below fails with pip's message."""

    def setUp(self):
        self.fail(f"transformers' common model tests are unavailable: {UNAVAILABLE}")


if COMMON is not None:
    ModelTesterMixin = COMMON.test_modeling_common.ModelTesterMixin
    ConfigTester = COMMON.test_configuration_common.ConfigTester
    ids_tensor = COMMON.test_modeling_common.ids_tensor
    random_attention_mask = COMMON.test_modeling_common.random_attention_mask
else:
    ModelTesterMixin = _CommonTestsUnavailable


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The mixin runs a few thousand forwards of a model 32 wide: one thread spares each product the thread pool's
    fork and join, which otherwise costs more than its arithmetic, all the more on a loaded machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_common_tests_run_offline():
    """None of the common tests may reach the Hub: conftest.py sets HF_HUB_OFFLINE before transformers is imported."""
    assert huggingface_hub.constants.HF_HUB_OFFLINE


# Outputs computed over the whole batch rather than row by row: a batch's value is not any of its rows' values.
BATCH_WIDE_OUTPUTS = frozenset(
    {"tokens_per_expert", "dropped_fraction", "load_balancing_loss", "router_z_loss", "aux_loss", "loss"}
)


class SwitchModelTester:
    """Tiny `SwitchConfig`s and inputs for the common tests, after transformers' `BertModelTester`.

    `num_hidden_layers` counts the Switch layers, as `SwitchConfig.num_hidden_layers` does: `hidden_states` holds
    the backbone's output and one per Switch layer. The backbone has a single layer: the common tests check the
    Switch layers, and BERT is tested by transformers itself.
    """

    def __init__(
        self,
        parent,
        *,
        expert_kinds: str,
        batch_size=13,
        seq_length=7,
        is_training=True,
        use_input_mask=True,
        use_token_type_ids=True,
        use_labels=True,
        vocab_size=99,
        hidden_size=32,
        num_backbone_layers=1,
        num_attention_heads=4,
        intermediate_size=37,
        hidden_act="gelu",
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        max_position_embeddings=512,
        type_vocab_size=16,
        num_experts=4,
        expert_intermediate_size=24,
        initializer_range=0.02,
        output_router_logits=False,
    ):
        self.parent = parent
        self.expert_kinds = expert_kinds
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.is_training = is_training
        self.use_input_mask = use_input_mask
        self.use_token_type_ids = use_token_type_ids
        self.use_labels = use_labels
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_backbone_layers = num_backbone_layers
        self.num_hidden_layers = len(expert_kinds)
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.hidden_act = hidden_act
        self.hidden_dropout_prob = hidden_dropout_prob
        self.attention_probs_dropout_prob = attention_probs_dropout_prob
        self.max_position_embeddings = max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.num_experts = num_experts
        self.expert_intermediate_size = expert_intermediate_size
        self.initializer_range = initializer_range
        self.output_router_logits = output_router_logits

    def get_config(self) -> SwitchConfig:
        backbone = BertConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_backbone_layers,
            num_attention_heads=self.num_attention_heads,
            intermediate_size=self.intermediate_size,
            hidden_act=self.hidden_act,
            hidden_dropout_prob=self.hidden_dropout_prob,
            attention_probs_dropout_prob=self.attention_probs_dropout_prob,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
            initializer_range=self.initializer_range,
        )
        return SwitchConfig(
            backbone_config=backbone,
            num_switch_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            hidden_dropout_prob=self.hidden_dropout_prob,
            expert_kinds=self.expert_kinds,
            num_experts=self.num_experts,
            expert_intermediate_size=self.expert_intermediate_size,
            # Dropless routing, in training and evaluation. With a capacity, which tokens an expert drops depends on
            # the other tokens of the batch, so a row's output would change with the rows around it, and the
            # mixin's batch-versus-row and padding comparisons would test the capacity rule rather than the model.
            # Capacity and dropping are tested in test_modeling_switch.py.
            capacity_factor_train=None,
            capacity_factor_eval=None,
            initializer_range=self.initializer_range,
            output_router_logits=self.output_router_logits,
        )

    def prepare_config_and_inputs(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        input_mask = random_attention_mask([self.batch_size, self.seq_length]) if self.use_input_mask else None
        token_type_ids = (
            ids_tensor([self.batch_size, self.seq_length], self.type_vocab_size) if self.use_token_type_ids else None
        )
        token_labels = ids_tensor([self.batch_size, self.seq_length], self.vocab_size) if self.use_labels else None
        return self.get_config(), input_ids, token_type_ids, input_mask, token_labels

    def create_and_check_model(self, config, input_ids, token_type_ids, input_mask, token_labels):
        model = SwitchModel(config).eval()
        num_routers = len(config.router_names)
        with torch.no_grad():
            model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids)
            model(input_ids, token_type_ids=token_type_ids)
            result = model(input_ids, output_routing=True)
        self.parent.assertEqual(result.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))
        self.parent.assertEqual(len(result.expert_indices), num_routers)
        self.parent.assertEqual(result.tokens_per_expert.shape, (num_routers, self.num_experts))

    def create_and_check_for_token_reconstruction(self, config, input_ids, token_type_ids, input_mask, token_labels):
        model = SwitchForTokenReconstruction(config).eval()
        with torch.no_grad():
            result = model(input_ids, attention_mask=input_mask, token_type_ids=token_type_ids, labels=token_labels)
        self.parent.assertEqual(result.logits.shape, (self.batch_size, self.seq_length, self.vocab_size))
        self.parent.assertEqual(result.loss.shape, ())

    def prepare_config_and_inputs_for_common(self):
        config, input_ids, token_type_ids, input_mask, _ = self.prepare_config_and_inputs()
        inputs_dict = {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": input_mask}
        return config, inputs_dict


class _SwitchModelTest(ModelTesterMixin):
    """The common tests for both Switch models with one kind of experts (`expert_kinds`, set by the subclasses)."""

    all_model_classes = (SwitchModel, SwitchForTokenReconstruction)
    expert_kinds: str
    # The config nests the backbone's (`backbone_config`): per-sub-config attention settings must reach it.
    _is_composite = True
    # The mixin runs its weight-initialisation check only for models whose files carry a copyright year of 2023 or
    # later, unless this is set; ours carry none, and a new model has no reason to be exempt.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        super().setUp()
        self.model_tester = SwitchModelTester(self, expert_kinds=self.expert_kinds)
        self.config_tester = ConfigTester(self, config_class=SwitchConfig, **self._config_tester_fields())
        self._register_with_mixin_name_tables()

    def _config_tester_fields(self) -> dict:
        """The tester's config as ConfigTester's keyword arguments, in the form the config's JSON holds them:
        ConfigTester compares each argument with the JSON the config writes (so no `BertConfig` object, whose dict
        also differs from its JSON in `id2label`'s integer keys)."""
        written = json.loads(self.model_tester.get_config().to_json_string())
        fields = ("backbone_config", "num_switch_layers", "num_attention_heads", "expert_kinds", "num_experts")
        return {field: written[field] for field in (*fields, "expert_intermediate_size")}

    def _register_with_mixin_name_tables(self):
        """Lists the Switch models in the mixin's copies of transformers' Auto name tables.

        The mixin tells a base model from a head, and picks the labels to build, by class name in transformers'
        static tables (`MODEL_MAPPING_NAMES`, `MODEL_FOR_MASKED_LM_MAPPING_NAMES`), which list only the models
        transformers ships. switch_hf registers its classes with `AutoModel` and `AutoModelForMaskedLM` instead;
        the names added here are read from those registrations, in the mixin module's namespace only, for this test.
        """
        module = COMMON.test_modeling_common
        registrations = {
            "MODEL_MAPPING_NAMES": MODEL_MAPPING[SwitchConfig],
            "MODEL_FOR_MASKED_LM_MAPPING_NAMES": MODEL_FOR_MASKED_LM_MAPPING[SwitchConfig],
        }
        for table, model_class in registrations.items():
            names = OrderedDict(getattr(module, table))
            names[SwitchConfig.model_type] = model_class.__name__
            patcher = mock.patch.object(module, table, names)
            patcher.start()
            self.addCleanup(patcher.stop)

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())

    def test_for_token_reconstruction(self):
        self.model_tester.create_and_check_for_token_reconstruction(*self.model_tester.prepare_config_and_inputs())

    def test_sdpa_can_dispatch_non_composite_models(self):
        """The mixin runs this layer-by-layer dispatch check for models without sub-configs only, yet it applies here:
        loaded with `attn_implementation="eager"`, no attention layer, the backbone's included, may run SDPA."""
        with mock.patch.object(self, "_is_composite", False):
            super().test_sdpa_can_dispatch_non_composite_models()

    def test_batching_equivalence(self, atol=1e-5, rtol=1e-5):
        """The mixin's check on every per-row output (hidden states, logits, router logits); the batch-wide routing
        statistics are checked against the rows' separately.

        `tokens_per_expert`, `dropped_fraction` and the losses are taken over all the batch's tokens, so a batch's
        value is not its first row's: the mixin would compare them as if they were rows. Routing is dropless here
        (see `SwitchModelTester.get_config`), so each row's outputs do not depend on the others.
        """
        # Router logits are per token, hence per row: have the models return them, so that they are compared too.
        with _per_row_outputs_only(self.all_model_classes), mock.patch.object(
            self.model_tester, "output_router_logits", True
        ):
            super().test_batching_equivalence(atol=atol, rtol=rtol)
        self._check_tokens_per_expert_sums_over_rows()

    def test_can_init_all_missing_weights(self):
        """The mixin's check of how missing weights are initialised. switch-hf refuses a checkpoint lacking base
        weights unless `strict=False` is passed, which this runs with."""
        with _lenient_loading():
            super().test_can_init_all_missing_weights()

    def test_model_weights_reload_no_missing_tied_weights(self):
        """As above: the mixin saves partial weights on purpose and reloads them, so it runs with `strict=False`."""
        with _lenient_loading():
            super().test_model_weights_reload_no_missing_tied_weights()

    def _check_tokens_per_expert_sums_over_rows(self):
        """Dropless, each token reaches its experts whatever the batch: the batch's load is the sum of its rows'."""
        config, inputs = self.model_tester.prepare_config_and_inputs_for_common()
        model = SwitchModel(config).eval()
        with torch.no_grad():
            batched = model(**inputs, output_routing=True).tokens_per_expert  # (routers, e)
            rows = [model(**{key: value[row : row + 1] for key, value in inputs.items()}, output_routing=True)
                    .tokens_per_expert for row in range(self.model_tester.batch_size)]  # fmt: skip
        torch.testing.assert_close(batched, torch.stack(rows).sum(0))


@contextmanager
def _lenient_loading():
    """`from_pretrained` with `strict=False` unless the caller says otherwise."""
    strict_from_pretrained = SwitchPreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        kwargs.setdefault("strict", False)
        return strict_from_pretrained(cls, *args, **kwargs)

    with mock.patch.object(SwitchPreTrainedModel, "from_pretrained", classmethod(from_pretrained)):
        yield


@contextmanager
def _per_row_outputs_only(model_classes):
    """Patches each class's `forward` to return a dict of its per-row outputs only, when called from outside a model.

    `SwitchForTokenReconstruction` reads its inner `SwitchModel`'s statistics, so only the outermost call, counted
    across all the patched classes, drops them.
    """
    depth = 0

    def patched(forward):
        def per_row_forward(self, *args, **kwargs):
            nonlocal depth
            depth += 1
            try:
                output = forward(self, *args, **kwargs)
            finally:
                depth -= 1
            if depth > 0 or not hasattr(output, "items"):
                return output
            return {key: value for key, value in output.items() if key not in BATCH_WIDE_OUTPUTS}

        return per_row_forward

    with ExitStack() as stack:
        for model_class in model_classes:
            stack.enter_context(mock.patch.object(model_class, "forward", patched(model_class.forward)))
        yield


# A few of the mixin's slowest tests check something the kind of experts does not change; they run in one class.
# `test_bc_torch_dtype` loads every model with `torch_dtype=` and with `dtype=` and compares them: one code path for
# every kind, and `SwitchBothExpertsTest` has both kinds of routers, which stay float32.
_KIND_INDEPENDENT = "independent of the kind of experts: SwitchBothExpertsTest runs it"


class SwitchFeedForwardExpertsTest(_SwitchModelTest, unittest.TestCase):
    expert_kinds = "ff"

    @unittest.skip(reason=_KIND_INDEPENDENT)
    def test_bc_torch_dtype(self):
        pass


class SwitchAttentionExpertsTest(_SwitchModelTest, unittest.TestCase):
    expert_kinds = "aa"

    @unittest.skip(reason=_KIND_INDEPENDENT)
    def test_bc_torch_dtype(self):
        pass

    # The mixin's test sets each experts implementation and checks that the experts ran through it. With attention
    # experts only there is no module of transformers' experts interface (`SwitchExperts`) to run: the attention
    # experts' projections run between the attention's own steps, not through that interface. The other two classes
    # run it.
    _NO_EXPERTS_INTERFACE = "attention experts only: no SwitchExperts module, so no experts implementation to select"

    @unittest.skip(reason=_NO_EXPERTS_INTERFACE)
    def test_eager_matches_batched_and_grouped_inference_0_fp16(self):
        pass

    @unittest.skip(reason=_NO_EXPERTS_INTERFACE)
    def test_eager_matches_batched_and_grouped_inference_1_fp32(self):
        pass

    @unittest.skip(reason=_NO_EXPERTS_INTERFACE)
    def test_eager_matches_batched_and_grouped_inference_2_bf16(self):
        pass


class SwitchBothExpertsTest(_SwitchModelTest, unittest.TestCase):
    expert_kinds = "bb"


# The mixin's eager-versus-SDPA comparisons (24 variants) exercise the attention implementations: in the attention
# experts' layers of "aa" they run the same module as in those of "bb", and a dense feed-forward block has no attention
# implementation to choose. They run on "ff" (the Switch layers' plain attention) and on "bb".
_SAME_ATTENTION_AS_BOTH = "the attention experts run the same code in SwitchBothExpertsTest, which runs it"
for _name in [name for name in dir(ModelTesterMixin) if name.startswith("test_eager_matches_sdpa_inference_")]:
    setattr(SwitchAttentionExpertsTest, _name, unittest.skip(reason=_SAME_ATTENTION_AS_BOTH)(lambda self: None))
