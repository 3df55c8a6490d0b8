"""Switch Transformer layers on top of a BERT backbone, for token reconstruction and fill-mask.

    input_ids --BERT backbone--> hidden states --N x SwitchLayer--> LayerNorm --head--> token logits

Each `SwitchLayer` is pre-LayerNorm multi-head self-attention followed by a Switch mixture-of-experts feed-forward
block: a float32 router sends every token to its top-k experts (top-1 by default), each expert accepts at most
`capacity` tokens, and tokens over capacity are dropped, passing through the residual unchanged (Fedus et al.,
2021, "Switch Transformers"; Zoph et al., 2022, "ST-MoE" for top-k priority and the router z-loss). A layer can
route its attention instead, or as well (`config.expert_kinds`): attention experts own the query and output
projections while keys and values are shared (Zhang et al., 2022, "Mixture of Attention Heads"). Beyond the Switch
paper, `config.router_type="expert_choice"` has every expert pick its tokens instead (Zhou et al., 2022), and
`config.router_bias_update_rate` balances token choice with a routing bias instead of a loss (Wang et al., 2024).

Index letters in shape comments: b batch, s sequence, h hidden, t tokens (b * s), e experts, k top-k choices,
c expert capacity, p routed (token, expert) pairs, v vocabulary.

This file and `configuration_switch.py` import only torch and transformers, so that `save_pretrained` can ship
them with a checkpoint for `trust_remote_code=True`.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from transformers import BertModel, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.integrations import use_experts_implementation
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS, _grouped_mm
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, logging
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .configuration_switch import SwitchConfig


logger = logging.get_logger(__name__)


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast runs products in on this device type, or None outside an autocast region."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def _autocast_disabled(device_type: str):
    """A context that turns autocast off on this device type (a no-op where autocast does not exist)."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


class LayerRouting(NamedTuple):
    """What one Switch layer's router decided, for the losses, the outputs and logging.

    router_logits: (t, e) in the router dtype. expert_index: (t, k) with token choice, -1 where the token was dropped
    or is padding; (t, e) with expert choice, each token's experts in increasing order, then -1.
    load_balancing_loss, z_loss, dropped_fraction: scalars. tokens_per_expert: (e,) tokens each expert processed.
    """

    router_logits: torch.Tensor
    expert_index: torch.Tensor
    load_balancing_loss: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor
    dropped_fraction: torch.Tensor

    @classmethod
    def regroup(cls, fields: tuple[torch.Tensor, ...]) -> list["LayerRouting"]:
        """The routings of a layer from the flat tuple of their fields that `SwitchLayer.forward` returns."""
        size = len(cls._fields)
        return [cls(*fields[start : start + size]) for start in range(0, len(fields), size)]


class RoutedPairs(NamedTuple):
    """The (token, choice) pairs a router kept: `token`, `choice`, `expert` (p,) long, `gate` (p,).

    `choice` numbers a token's pairs from 0, below `choices_per_token` (top_k with token choice; with expert choice the
    most experts one token got, or num_experts in compiled code), so `(token, choice)` indexes a (t, choices_per_token)
    layout. Token choice lists the pairs in token order, expert choice in expert order.
    """

    token: torch.Tensor
    choice: torch.Tensor
    expert: torch.Tensor
    gate: torch.Tensor
    choices_per_token: int


class SwitchRouter(nn.Module):
    """The Switch router: a linear layer without bias scores the experts, then either every token takes its top-k and
    each expert accepts at most `capacity` of them, tokens over capacity being dropped (token choice; Fedus et al.,
    2021), or every expert takes its top-`capacity` tokens (expert choice; Zhou et al., 2022).

    With `router_bias_update_rate > 0` (token choice), a per-expert bias (`expert_bias`, saved with the model) is added
    to the routing probabilities to choose the experts, not to the gates (Wang et al., 2024). The load that moves it is
    counted during the backward pass of each training forward, so a forward recomputed by gradient checkpointing (no
    backward of its own) is not counted twice and micro-batches of gradient accumulation add up;
    `update_bias`, called after each optimizer step, moves the bias and starts a new count.

    Shared by feed-forward and attention experts, so both route, drop and balance the same way.
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.router_type = config.router_type
        self.capacity_factor_train = config.capacity_factor_train
        self.capacity_factor_eval = config.capacity_factor_eval
        self.jitter_noise = config.router_jitter_noise
        self.bias_update_rate = config.router_bias_update_rate
        self.dtype = getattr(torch, config.router_dtype)
        # float32 whatever the default dtype: `_keep_in_fp32_modules_strict` keeps the router float32 when a checkpoint
        # loads in bfloat16 or float16, and a model built from its config under a lower default dtype must agree.
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.hidden_size, dtype=torch.float32))
        if self.bias_update_rate > 0:
            # Only where balancing by bias is on: checkpoints without it (the released one) keep loading strictly.
            self.register_buffer("expert_bias", torch.zeros(config.num_experts, dtype=torch.float32))
            # Routing choices per expert counted since the last `update_bias`; not saved (a count, not a weight).
            self.register_buffer("pending_load", torch.zeros(config.num_experts, dtype=torch.float32), persistent=False)

    def forward(
        self, hidden_states: torch.Tensor, token_mask: torch.Tensor
    ) -> tuple[torch.Tensor, RoutedPairs, LayerRouting]:
        """
        Args:
            hidden_states: (..., h), e.g. (b, s, h) or (t, h).
            token_mask: (...) bool, False for padding: padding is never routed and never counted in the losses.
        Returns:
            The router logits (..., e) in float32 (what `output_router_logits` records), the kept (token,
            expert) pairs, tokens numbered in flattened (t,) order, and the routing summary (losses, load, drops).
        """
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (t, h)
        token_mask = token_mask.reshape(-1)  # (t,)
        router_logits = self.logits(tokens).float()  # (t, e)
        # softmax through the log-normaliser, which the z-loss needs as well: computed once, and `softmax` over a
        # short last dimension (a few experts) is several times slower than this.
        log_normalizer = router_logits.logsumexp(dim=-1, keepdim=True)  # (t, 1)
        router_probs = (router_logits - log_normalizer).exp()  # (t, e)
        capacity_factor = self.capacity_factor_train if self.training else self.capacity_factor_eval
        choose = self._experts_choose if self.router_type == "expert_choice" else self._tokens_choose
        pairs, routing = choose(router_logits, log_normalizer, router_probs, token_mask, capacity_factor, tokens.dtype)
        return router_logits.view(*hidden_states.shape[:-1], -1), pairs, routing

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens: (t, h) -> router logits (t, e) in the router dtype."""
        # Selective precision (Fedus et al., 2021, section 2.4): the softmax over experts is unstable in bfloat16, so
        # the router computes in its own dtype whatever the model's dtype, and outside autocast, which would round
        # the product to bfloat16 before the float32 softmax.
        with _autocast_disabled(tokens.device.type):
            tokens = tokens.to(self.dtype)
            if self.training and self.jitter_noise > 0:
                # The noise perturbs only the routing decision, never the experts' input.
                noise = torch.empty_like(tokens).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
                tokens = tokens * noise
            return F.linear(tokens, self.weight.to(self.dtype))  # (t, e)

    @torch.no_grad()
    def update_bias(self):
        """Moves `expert_bias` by `bias_update_rate * sign(mean load - load)` over the routing choices counted since
        the last call (an under-loaded expert gains, an over-loaded one loses), then starts a new count."""
        load = self.pending_load
        self.expert_bias.add_(self.bias_update_rate * torch.sign(load.mean() - load))
        load.zero_()

    def _tokens_choose(
        self, router_logits, log_normalizer, router_probs, token_mask, capacity_factor: float | None, dtype: torch.dtype
    ) -> tuple[RoutedPairs, LayerRouting]:
        """Token choice: each real token's top-k experts, within capacity. Shapes as in `forward`."""
        scores = router_probs
        if self.bias_update_rate > 0:
            scores = router_probs + self.expert_bias  # (t, e) for the choice only: the gates stay the probabilities
        if self.top_k == 1:
            gate, expert_choice = scores.max(dim=-1, keepdim=True)  # the same as topk(1), several times faster
        else:
            gate, expert_choice = scores.topk(self.top_k, dim=-1)  # (t, k), (t, k)
        if self.bias_update_rate > 0:
            gate = router_probs.gather(-1, expert_choice)  # (t, k)
            if self.training and router_logits.requires_grad:
                self._count_load_in_backward(router_logits, self._choices_per_expert(expert_choice, token_mask))

        kept = self._within_capacity(expert_choice, token_mask, capacity_factor)  # (t, k) bool
        num_tokens, top_k = expert_choice.shape
        if torch.compiler.is_compiling():
            # A compiled graph needs shapes that do not depend on the data: every (token, choice) pair travels, a
            # dropped or padding pair with gate 0, hence a zero output, instead of being left out by `nonzero`.
            pairs = RoutedPairs(
                token=torch.arange(num_tokens, device=kept.device).repeat_interleave(top_k),
                choice=torch.arange(top_k, device=kept.device).repeat(num_tokens),
                expert=expert_choice.reshape(-1),
                gate=(gate * kept).reshape(-1).to(dtype),
                choices_per_token=top_k,
            )
        else:
            token, choice = kept.nonzero(as_tuple=True)  # (p,), (p,)
            pairs = RoutedPairs(
                token=token,
                choice=choice,
                expert=expert_choice[token, choice],
                gate=gate[token, choice].to(dtype),
                choices_per_token=top_k,
            )
        summary = self._routing_summary(router_logits, log_normalizer, router_probs, expert_choice, kept, token_mask)
        return pairs, summary

    def _choices_per_expert(self, expert_choice: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """How many of the real tokens' choices (t, k) picked each expert, capacity aside: (e,) float."""
        weight = token_mask.float().repeat_interleave(expert_choice.shape[-1])  # (t * k,)
        return torch.zeros(self.num_experts, device=weight.device).index_add_(0, expert_choice.reshape(-1), weight)

    def _count_load_in_backward(self, router_logits: torch.Tensor, choices: torch.Tensor):
        """Adds `choices` (e,) to `pending_load` when the backward pass reaches `router_logits`: once per forward that
        is trained on. A forward that gradient checkpointing recomputes either has no graph of its own until then
        (reentrant: the first pass ran without gradients) or is never differentiated (non-reentrant)."""
        pending_load = self.pending_load

        def count(grad: torch.Tensor) -> None:
            pending_load.add_(choices)

        router_logits.register_hook(count)

    def _experts_choose(
        self, router_logits, log_normalizer, router_probs, token_mask, capacity_factor: float, dtype: torch.dtype
    ) -> tuple[RoutedPairs, LayerRouting]:
        """Expert choice (Zhou et al., 2022): each expert takes the `capacity` real tokens with the highest probability
        for it, capacity = ceil(capacity_factor * top_k * real_tokens / e), at most all of them. Shapes as in
        `forward`; c below is the capacity the token count allows, t with padding included."""
        num_tokens = router_probs.shape[0]
        # A capacity from the shape, so that compiled code sees a fixed size; the real tokens' capacity masks it.
        max_capacity = min(num_tokens, math.ceil(capacity_factor * self.top_k * num_tokens / self.num_experts))
        # Padding scores -inf: an expert reaches it only past its real tokens, and never keeps it.
        scores = router_probs.masked_fill(~token_mask.unsqueeze(-1), float("-inf"))  # (t, e)
        gate, token = scores.topk(max_capacity, dim=0)  # (c, e), (c, e): each expert's tokens, best first
        num_real = token_mask.sum()
        capacity = torch.ceil(capacity_factor * self.top_k * num_real / self.num_experts).clamp(max=num_real)
        rank = torch.arange(max_capacity, device=token.device).unsqueeze(-1)  # (c, 1)
        kept = (rank < capacity) & token_mask[token]  # (c, e)
        chosen = torch.zeros_like(router_probs, dtype=torch.bool).scatter_(0, token, kept)  # (t, e) expert took token

        # A token's experts in increasing order: where it was not chosen, e sorts last and becomes -1.
        expert_ids = torch.arange(self.num_experts, device=token.device)
        expert_index = torch.where(chosen, expert_ids, self.num_experts).sort(dim=-1).values  # (t, e)
        expert_index = expert_index.masked_fill(expert_index == self.num_experts, -1)
        expert = expert_ids.expand_as(token)  # (c, e)
        if torch.compiler.is_compiling():
            # Fixed shapes: every slot travels, one past capacity or on padding with gate 0 (a zero output; padding's
            # score is -inf, hence `where`, not a product). A token's choice is its expert: distinct, below e.
            token, expert = token.reshape(-1), expert.reshape(-1)
            gate = torch.where(kept, gate, 0.0).reshape(-1)
            pairs = RoutedPairs(token, expert, expert, gate.to(dtype), choices_per_token=self.num_experts)
        else:
            token, expert, gate = token[kept], expert[kept], gate[kept]  # (p,)
            # Each pair's place among its token's experts: the (token, choice) slot attention experts query from.
            choice = (chosen.cumsum(dim=-1) - 1)[token, expert]  # (p,)
            choices_per_token = max(int(chosen.sum(dim=-1).max()), 1)
            pairs = RoutedPairs(token, choice, expert, gate.to(dtype), choices_per_token=choices_per_token)
        unserved = (~chosen.any(dim=-1) & token_mask).sum()
        return pairs, LayerRouting(
            router_logits=router_logits,
            expert_index=expert_index,
            # Nothing to balance: every expert takes the same number of tokens.
            load_balancing_loss=router_probs.new_zeros(()),
            z_loss=self._z_loss(log_normalizer, token_mask),
            tokens_per_expert=kept.sum(dim=0).float(),
            dropped_fraction=unserved / token_mask.sum().clamp(min=1),
        )

    def _within_capacity(
        self, expert_choice: torch.Tensor, token_mask: torch.Tensor, capacity_factor: float | None
    ) -> torch.Tensor:
        """Which (token, choice) pairs fit in their expert: (t, k) bool.

        Each expert takes at most ceil(capacity_factor * k * real_tokens / e) pairs. Priority goes choice by choice,
        then in token order: every token's first choice is served before any second choice (ST-MoE, GShard).
        The ranking sorts pairs by expert instead of building a (tokens x experts) mask, so its cost does not grow
        with the number of experts.
        """
        num_tokens, top_k = expert_choice.shape
        routable = token_mask.unsqueeze(-1).expand(num_tokens, top_k)  # (t, k)
        if capacity_factor is None:
            return routable.clone()

        # Choice-major order: all first choices, then all second choices. Padding goes to an extra bucket `e`.
        pair_expert = expert_choice.t().masked_fill(~routable.t(), self.num_experts).reshape(-1)  # (k * t,)
        sorted_expert, order = torch.sort(pair_expert, stable=True)
        # Counted into a fixed-size tensor: bincount's output size depends on the data, which torch.compile rejects.
        pairs_per_expert = torch.zeros(self.num_experts + 1, dtype=torch.long, device=pair_expert.device).index_add_(
            0, sorted_expert, torch.ones_like(sorted_expert)
        )  # (e + 1,)
        first_slot = pairs_per_expert.cumsum(0) - pairs_per_expert
        rank_sorted = torch.arange(pair_expert.numel(), device=pair_expert.device) - first_slot[sorted_expert]
        rank = torch.empty_like(rank_sorted).scatter_(0, order, rank_sorted)  # (k * t,) position in its expert

        capacity = torch.ceil(capacity_factor * top_k * token_mask.sum() / self.num_experts)
        return routable & (rank.view(top_k, num_tokens).t() < capacity)

    def _routing_summary(
        self, router_logits, log_normalizer, router_probs, expert_choice, kept, token_mask
    ) -> LayerRouting:
        """Token choice's aux losses and load statistics over the real (non-padding) tokens."""
        weight = token_mask.float()  # (t,)
        num_real = weight.sum().clamp(min=1.0)
        top_k = expert_choice.shape[-1]

        # Load-balancing loss, N * sum_i f_i * P_i (Fedus et al., 2021, eq. 4-6). f_i is the fraction of routing
        # choices that pick expert i before capacity is applied, so that sum_i f_i = 1 for any k and a uniform
        # router gives exactly 1.0.
        fraction_routed = self._choices_per_expert(expert_choice, token_mask) / (num_real * top_k)  # (e,)
        mean_probability = (router_probs * weight.unsqueeze(-1)).sum(0) / num_real  # (e,)
        load_balancing_loss = self.num_experts * (fraction_routed * mean_probability).sum()

        tokens_per_expert = torch.zeros(self.num_experts, device=weight.device).index_add_(
            0, expert_choice.reshape(-1), kept.reshape(-1).float()
        )  # (e,)
        dropped_fraction = 1.0 - kept.sum() / (num_real * top_k)
        return LayerRouting(
            router_logits=router_logits,
            expert_index=expert_choice.masked_fill(~kept, -1),
            load_balancing_loss=load_balancing_loss,
            z_loss=self._z_loss(log_normalizer, token_mask),
            tokens_per_expert=tokens_per_expert,
            dropped_fraction=dropped_fraction,
        )

    @staticmethod
    def _z_loss(log_normalizer: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
        """Router z-loss (Zoph et al., 2022, eq. 5) over the real tokens: keeps the router's logits small, hence its
        softmax stable."""
        weight = token_mask.float()  # (t,)
        return ((log_normalizer.squeeze(-1) ** 2) * weight).sum() / weight.sum().clamp(min=1.0)


@use_experts_implementation(has_gate=False, has_bias=True)
class SwitchExperts(nn.Module):
    """`num_experts` feed-forward networks (h -> intermediate -> h) stored as stacked 3D parameters.

    The layout (`up_proj`: (e, intermediate, h), `down_proj`: (e, h, intermediate), each with a bias) is the one
    transformers' experts interface expects, so `experts_implementation="by_device" | "sorted_mm" | "grouped_mm" |
    "eager" | "batched_mm"` selects how the experts run, and transformers' expert-parallel plan can shard them.
    `by_device`, the default, runs `sorted_mm` on CPU tensors and `grouped_mm` on GPU tensors, decided at each call
    (`by_device_experts_forward`).

    Every implementation receives only the routed (token, expert) pairs: capacity and dropping are decided by
    [`SwitchRouter`] beforehand, so all implementations share the same semantics. Expert ids outside
    `[0, num_experts)` are skipped (zero output): expert parallelism marks the pairs of other ranks' experts so.
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.num_experts = config.num_experts
        intermediate, hidden = config.expert_intermediate_size, config.hidden_size
        self.up_proj = nn.Parameter(torch.empty(self.num_experts, intermediate, hidden))
        self.up_proj_bias = nn.Parameter(torch.empty(self.num_experts, intermediate))
        self.down_proj = nn.Parameter(torch.empty(self.num_experts, hidden, intermediate))
        self.down_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden))
        # Expert dropout sits on the inner activations (Fedus et al., 2021, section 2.4). Folding it into `act_fn`
        # keeps it inside every experts implementation, which all call `act_fn` between the two projections.
        self.act_fn = nn.Sequential(ACT2FN[config.expert_hidden_act], nn.Dropout(config.expert_dropout))
        # The activations switch_hf's fused kernel computes itself (`_expert_kernel_runs`); ACT2FN's "gelu" is the
        # exact GELU, as the kernel's.
        self.kernel_activation = config.expert_hidden_act if config.expert_hidden_act in ("gelu", "relu") else None

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """The reference ("eager") implementation, one expert at a time.

        Args:
            hidden_states: (p, h) the routed tokens.
            top_k_index: (p, k) the expert of each token and choice.
            top_k_weights: (p, k) the gate value that scales each expert's output.
        Returns:
            (p, h) the gated sum of each token's experts' outputs.
        """
        output = torch.zeros_like(hidden_states)
        for expert in top_k_index.unique().tolist():
            if not 0 <= expert < self.num_experts:
                continue  # another rank's expert under expert parallelism
            token, choice = torch.where(top_k_index == expert)
            inner = self.act_fn(F.linear(hidden_states[token], self.up_proj[expert], self.up_proj_bias[expert]))
            expert_output = F.linear(inner, self.down_proj[expert], self.down_proj_bias[expert])
            # Under autocast the products are in its lower precision; the sum stays in the input's dtype.
            output.index_add_(0, token, (expert_output * top_k_weights[token, choice, None]).to(output.dtype))
        return output


class _SortedExpertsLinear(torch.autograd.Function):
    """`output[rows of expert i] = input[rows of expert i] @ weight[i].T + bias[i]`, for `input` sorted by expert.

    One matrix product per expert that has rows, on a contiguous slice, written straight into a preallocated output;
    experts without rows cost nothing. The backward writes each expert's weight gradient into one preallocated
    (e, ...) tensor: letting autograd differentiate `weight[i]` would instead build a zero gradient of the whole
    stacked weight for every expert, O(e^2) memory traffic.
    """

    @staticmethod
    def forward(ctx, input, weight, bias, rows_per_expert: list[int], is_transposed: bool):
        """
        Args:
            input: (n, in) rows sorted by expert, `rows_per_expert[i]` rows for expert i, `sum(rows_per_expert) == n`.
            weight: (e, out, in), or (e, in, out) when `is_transposed`.
            bias: (e, out) or None.
        Returns:
            (n, out).
        """
        output = input.new_empty(input.shape[0], weight.shape[2] if is_transposed else weight.shape[1])
        # Per-expert views, made in one call each rather than sliced expert by expert: at 128 experts the Python
        # bookkeeping of the loop is otherwise a visible share of the time.
        per_expert = zip(
            input.split(rows_per_expert),
            output.split(rows_per_expert),
            weight if is_transposed else weight.transpose(1, 2),  # (in, out) each
            bias if bias is not None else [None] * weight.shape[0],
        )
        for expert_input, expert_output, expert_weight, expert_bias in per_expert:
            if expert_input.shape[0] == 0:
                continue
            torch.mm(expert_input, expert_weight, out=expert_output)
            if expert_bias is not None:
                # In place on the view, while it is still in cache.
                expert_output.add_(expert_bias)
        ctx.save_for_backward(input, weight)
        ctx.rows_per_expert = rows_per_expert
        ctx.is_transposed = is_transposed
        return output

    @staticmethod
    def backward(ctx, grad_output):
        input, weight = ctx.saved_tensors
        gradients = sorted_linear_backward(
            input, weight, grad_output, ctx.rows_per_expert, ctx.is_transposed, *ctx.needs_input_grad[:3]
        )
        return *gradients, None, None


def sorted_linear(
    input: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    rows_per_expert: list[int],
    is_transposed: bool,
) -> torch.Tensor:
    """[`_SortedExpertsLinear`] with the dtype rule of `F.linear`: inside an autocast region the products run in
    autocast's dtype, elsewhere in the weight's. The casts happen outside the autograd function, so gradients reach
    float32 weights in float32, as they do through an autocast `nn.Linear`."""
    dtype = _autocast_dtype(input.device.type) or weight.dtype
    bias = bias.to(dtype) if bias is not None else None
    return _SortedExpertsLinear.apply(input.to(dtype), weight.to(dtype), bias, rows_per_expert, is_transposed)


def sorted_linear_backward(
    input: torch.Tensor,
    weight: torch.Tensor,
    grad_output: torch.Tensor,
    rows_per_expert: list[int],
    is_transposed: bool,
    needs_input_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """The backward of `_SortedExpertsLinear`: one matrix product per expert and gradient, each written into its
    slice of a preallocated tensor.

    Args:
        input: (n, in) the rows the forward multiplied, sorted by expert.
        weight: (e, out, in), or (e, in, out) when `is_transposed`.
        grad_output: (n, out).
    Returns:
        The gradients of `input` (n, in), of `weight`, and of the bias (e, out); None where not needed. An expert
        without rows gets zero weight and bias gradients.
    """
    num_experts = weight.shape[0]
    grad_output = grad_output.contiguous()
    # Where switch_hf's kernel ops take these tensors, the products run there, with the experts split between threads
    # (`expert_kernel.cpp`), and the loop below only sums the bias gradients.
    kernel_ops = _expert_matmul_ops_for(input, grad_output, weight)
    products_in_loop = kernel_ops is None
    grad_input = grad_weight = None
    if needs_input_grad:
        weight_by_rows = weight.transpose(1, 2) if is_transposed else weight  # (e, out, in)
        grad_input = (
            torch.empty_like(input)
            if products_in_loop
            else kernel_ops.expert_matmul(grad_output, weight_by_rows, rows_per_expert)
        )
    if needs_weight_grad:
        left, right = (input, grad_output) if is_transposed else (grad_output, input)
        grad_weight = (
            torch.empty_like(weight)
            if products_in_loop
            else kernel_ops.expert_outer_products(left, right, rows_per_expert)
        )
    grad_bias = grad_output.new_empty(num_experts, grad_output.shape[1]) if needs_bias_grad else None
    if not products_in_loop and grad_bias is None:
        return grad_input, grad_weight, grad_bias

    per_expert = zip(
        input.split(rows_per_expert),
        grad_output.split(rows_per_expert),  # (rows, out) each
        weight.transpose(1, 2) if is_transposed else weight,  # (out, in) each
        grad_input.split(rows_per_expert) if products_in_loop and needs_input_grad else [None] * num_experts,
        grad_weight if products_in_loop and needs_weight_grad else [None] * num_experts,
        grad_bias if grad_bias is not None else [None] * num_experts,
    )
    for expert_input, expert_grad_output, expert_weight, expert_grad_input, expert_grad_weight, expert_grad_bias in per_expert:
        if expert_input.shape[0] == 0:
            # The one place an expert without rows costs anything: its gradient must read zero.
            if expert_grad_weight is not None:
                expert_grad_weight.zero_()
            if expert_grad_bias is not None:
                expert_grad_bias.zero_()
            continue
        if expert_grad_input is not None:
            torch.mm(expert_grad_output, expert_weight, out=expert_grad_input)
        if expert_grad_weight is not None:
            if is_transposed:
                torch.mm(expert_input.t(), expert_grad_output, out=expert_grad_weight)
            else:
                torch.mm(expert_grad_output.t(), expert_input, out=expert_grad_weight)
        if expert_grad_bias is not None:
            torch.sum(expert_grad_output, dim=0, out=expert_grad_bias)
    return grad_input, grad_weight, grad_bias


def _expert_matmul_ops_for(*tensors: torch.Tensor):
    """`torch.ops.switch_hf` (`expert_matmul`, `expert_outer_products`) where switch_hf's kernel ops are registered and
    take these tensors (plain, on the CPU, of one dtype), else None."""
    registered = use_expert_kernel and hasattr(torch.ops.switch_hf, "expert_outer_products")
    if not registered or len({tensor.dtype for tensor in tensors}) > 1 or not _plain_cpu(tensors):
        return None
    return torch.ops.switch_hf


def _plain_cpu(tensors) -> bool:
    """Plain tensors on the CPU: not DTensor shards nor other subclasses, whose dispatch switch_hf's ops do not know."""
    return all(type(tensor) in (torch.Tensor, nn.Parameter) and tensor.device.type == "cpu" for tensor in tensors)


def group_by_expert(expert_ids: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, list[int]]:
    """Orders rows by expert for `_SortedExpertsLinear`.

    Args:
        expert_ids: (n,) the expert of each row; ids outside [0, num_experts) are skipped (expert parallelism marks
            other ranks' experts that way).
    Returns:
        `order`, (m,) the rows that run, grouped by expert and in their original order within each expert, and
        `rows_per_expert`, how many rows each expert has (the one host sync).
    """
    expert_ids = expert_ids.masked_fill((expert_ids < 0) | (expert_ids >= num_experts), num_experts)
    # Stable, so each expert sees its rows in their original order: results do not depend on the sort.
    order = torch.argsort(expert_ids, stable=True)  # skipped rows last
    rows_per_expert = torch.bincount(expert_ids, minlength=num_experts + 1)[:num_experts].tolist()
    return order[: sum(rows_per_expert)], rows_per_expert


def inverse_permutation(permutation: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """(n,) distinct indices -> (size,) `inverse` with `inverse[permutation[i]] == i`, and -1 at the indices
    `permutation` lacks (`size` defaults to n: a full permutation, which leaves none). Gathering through it undoes a
    gather by `permutation`, in one pass instead of zero-filling then scattering."""
    inverse = permutation.new_full((permutation.shape[0] if size is None else size,), -1)
    inverse[permutation] = torch.arange(permutation.shape[0], device=permutation.device)
    return inverse


def sorted_mm_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "sorted_mm" experts implementation, which the default, "by_device", runs on CPU tensors.

    Sorts the (row, expert) pairs by expert once, then runs each expert as plain dense matrix products on its
    contiguous slice (see `_SortedExpertsLinear`). Nothing builds a per-expert mask over all rows, the Python loop
    runs over experts, never over rows, and experts without rows cost nothing; the one host sync is reading the
    per-expert row counts. Unlike transformers' `grouped_mm`, it needs no grouped-GEMM kernel (its CPU fallback
    zero-fills a whole weight gradient), adds each expert's bias on its slice instead of gathering a bias per row, and
    runs the same on every torch version. switch_hf's own experts run their forward on its fused kernel where that
    applies (`sorted_experts_feed_forward`). `docs/benchmarks.md` compares them all.

    Works with any experts module of transformers' layout (gated or not, with or without bias, transposed or not).

    Args:
        hidden_states: (p, h) rows to run.
        top_k_index: (p, k) expert of each row and choice; ids outside [0, num_experts) are skipped (expert
            parallelism marks other ranks' experts that way).
        top_k_weights: (p, k) the gate value that scales each expert's output.
    Returns:
        (p, h) the gated sum of each row's experts' outputs; zero for a row whose experts were all skipped.
    """
    top_k = top_k_index.shape[1]
    order, rows_per_expert = group_by_expert(top_k_index.reshape(-1), self.num_experts)  # (n,) pairs that run
    rows = order // top_k if top_k > 1 else order  # (n,) the row of `hidden_states` behind each pair
    combine_on_kernel = top_k == 1 and not _needs_gradients(self, hidden_states, top_k_weights)
    if combine_on_kernel and _expert_kernel_runs(self, hidden_states):
        # Each row runs at most once, so the kernel also gates each output and writes it back to its row: the combine.
        # Only where nothing needs a gradient; where the gate does (training the router), the combine below gives it
        # its gradient, and the experts' networks do not run again in the backward.
        gate = top_k_weights.reshape(-1)[order].float()
        expert_output = torch.ops.switch_hf.expert_feed_forward(
            hidden_states.contiguous(), rows, rows_per_expert, *_kernel_weights(self), self.kernel_activation, gate
        )
        return expert_output.to(hidden_states.dtype)
    expert_output = sorted_experts_feed_forward(self, hidden_states, rows_per_expert, rows)  # (n, h)
    return combine_expert_outputs(expert_output, order, top_k_weights).to(hidden_states.dtype)


# Set to False to run the experts on torch's products alone even where switch_hf's kernel ops are registered (the
# benchmark times both side by side).
use_expert_kernel = True


def sorted_experts_feed_forward(
    self: nn.Module, hidden_states: torch.Tensor, rows_per_expert: list[int], rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The experts' feed-forward networks on rows taken in expert order, ungated: (n, h).

    The matrix-product part of "sorted_mm", between the grouping by expert and the combine back to row order: on
    switch_hf's fused kernel where it runs (`_expert_kernel_runs`), else on torch's products.

    Args:
        hidden_states: (p, h).
        rows_per_expert: how many of the n sorted rows each expert has, in expert order.
        rows: (n,) the row of `hidden_states` at each sorted position; None when `hidden_states` is already sorted.
    """
    if not _expert_kernel_runs(self, hidden_states):
        return _experts_on_torch_products(self, hidden_states, rows_per_expert, rows)
    if rows is None:
        rows = torch.arange(hidden_states.shape[0], device=hidden_states.device)
    weights = _kernel_weights(self)
    if _needs_gradients(self, hidden_states):
        # The forward of training: it also returns the inner activations and the activation's derivatives there, the
        # two (n, intermediate) tensors its backward reads (`expert_kernel.register_formulas`), which runs on the
        # kernel's per-expert products. A backward fused like the forward, tile by tile, measured slower
        # (`docs/benchmarks.md`).
        output, _, _ = torch.ops.switch_hf.expert_feed_forward_with_inner(
            hidden_states.contiguous(), rows, rows_per_expert, *weights, self.kernel_activation
        )
        return output
    return torch.ops.switch_hf.expert_feed_forward(
        hidden_states.contiguous(), rows, rows_per_expert, *weights, self.kernel_activation
    )


def _experts_on_torch_products(
    self: nn.Module, hidden_states: torch.Tensor, rows_per_expert: list[int], rows: torch.Tensor | None
) -> torch.Tensor:
    """`sorted_experts_feed_forward` on torch's products, one per expert and projection, with autograd."""
    if self.has_gate:
        up_weight, up_bias = self.gate_up_proj, self.gate_up_proj_bias if self.has_bias else None
    else:
        up_weight, up_bias = self.up_proj, self.up_proj_bias if self.has_bias else None
    down_bias = self.down_proj_bias if self.has_bias else None

    expert_input = hidden_states if rows is None else hidden_states.index_select(0, rows)
    inner = sorted_linear(
        expert_input, up_weight, up_bias, rows_per_expert, self.is_transposed
    )  # (n, intermediate), or (n, 2 * intermediate) when gated
    inner = self._apply_gate(inner) if self.has_gate else self.act_fn(inner)  # (n, intermediate)
    expert_output = sorted_linear(
        inner, self.down_proj, down_bias, rows_per_expert, self.is_transposed
    )  # (n, h)
    if self.has_post_expert_norm:
        expert_output = self.post_expert_norm(expert_output)
    return expert_output


def _kernel_weights(experts: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """(up, up_bias, down, down_bias) as the kernel ops take them, the biases None when the experts have none."""
    if experts.has_bias:
        return experts.up_proj, experts.up_proj_bias, experts.down_proj, experts.down_proj_bias
    return experts.up_proj, None, experts.down_proj, None


def _expert_weights(experts: nn.Module) -> list[torch.Tensor]:
    return [weight for weight in _kernel_weights(experts) if weight is not None]


def _needs_gradients(experts: nn.Module, hidden_states: torch.Tensor, *gates: torch.Tensor) -> bool:
    """Whether autograd will differentiate the experts' outputs: with respect to their input, their weights, or the
    `gates` that scale them (the router's gradient from the loss goes through the gates)."""
    tensors = [hidden_states, *gates, *_expert_weights(experts)]
    return torch.is_grad_enabled() and any(tensor.requires_grad for tensor in tensors)


def _expert_kernel_runs(experts: nn.Module, hidden_states: torch.Tensor) -> bool:
    """Whether switch_hf's fused kernel (`torch.ops.switch_hf`) can run these experts on these rows.

    The `switch_hf` package builds and registers the kernel when imported, on CPUs with AVX-512 (`expert_kernel.py`).
    It runs float32 [`SwitchExperts`] on the CPU, outside autocast, with a GELU or ReLU activation
    (`kernel_activation`), no active expert dropout and contiguous plain-tensor weights, with or without autograd
    (its backward on the kernel's product tiles); everything else (a model loaded with `trust_remote_code` alone among
    them) runs on torch.
    """
    if not use_expert_kernel or not hasattr(torch.ops.switch_hf, "expert_feed_forward_with_inner"):
        return False
    if getattr(experts, "kernel_activation", None) is None:
        return False
    if experts.has_gate or experts.is_transposed or experts.has_post_expert_norm:
        return False
    if experts.training and experts.act_fn[-1].p > 0:  # `act_fn` ends with the expert dropout
        return False
    # Autocast would run the products in its lower precision; the kernel computes in float32 only.
    if torch.is_autocast_enabled("cpu"):
        return False
    weights = _expert_weights(experts)
    tensors = [hidden_states, *weights]
    if not _plain_cpu(tensors) or any(tensor.dtype != torch.float32 for tensor in tensors):
        return False
    return all(weight.is_contiguous() for weight in weights)  # laid out as the kernel reads them


def combine_expert_outputs(expert_output: torch.Tensor, order: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """Each row's gate-weighted sum of its experts' outputs, read back from expert order.

    One embedding bag per row, over the row's pairs that ran: unsorting, gating and summing the choices take a single
    pass over the outputs (and a single pass back in the backward), instead of a multiply, a gather and a sum.

    Args:
        expert_output: (n, h) the outputs of the pairs that ran, in expert order.
        order: (n,) the pair (`row * k + choice`) behind each output row.
        top_k_weights: (p, k) the gate value of each pair.
    Returns:
        (p, h); zero for a row none of whose pairs ran.
    """
    num_rows, top_k = top_k_weights.shape
    position = inverse_permutation(order, num_rows * top_k)  # (p * k,) where each pair's output is, -1: did not run
    if order.shape[0] == num_rows * top_k:
        # Every pair ran (dropless, or compiled code, where dropped pairs run with a zero gate): each row has k pairs,
        # and no mask selects them, whose size would depend on the data.
        offsets = torch.arange(0, num_rows * top_k, top_k, device=order.device)
        weights = top_k_weights.reshape(-1).to(expert_output.dtype)
        return F.embedding_bag(position, expert_output, offsets=offsets, mode="sum", per_sample_weights=weights)
    ran = position >= 0
    pairs_per_row = ran.view(num_rows, top_k).sum(dim=1)  # (p,)
    return F.embedding_bag(
        position[ran],
        expert_output,
        offsets=pairs_per_row.cumsum(0) - pairs_per_row,
        mode="sum",
        per_sample_weights=top_k_weights.reshape(-1)[ran].to(expert_output.dtype),
    )


def by_device_experts_forward(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """The "by_device" experts implementation, switch-hf's default: "sorted_mm" where the rows are on the CPU (dense
    matrix products, and switch_hf's fused kernel where it applies), transformers' "grouped_mm" on any other device
    (one grouped product per projection instead of a loop over the experts).

    Decided at each call from where the tensors are, not when the model is built: a model kept on the CPU of a machine
    with a GPU runs "sorted_mm", and the same model moved to the GPU runs "grouped_mm". Code compiled with
    `torch.compile` runs "grouped_mm" on the CPU as well: "sorted_mm" reads the per-expert row counts on the host, a
    graph break, where the grouped product takes them as a tensor. Arguments and result as in
    [`sorted_mm_experts_forward`].
    """
    if hidden_states.device.type == "cpu" and not torch.compiler.is_compiling():
        return sorted_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    return ALL_EXPERTS_FUNCTIONS["grouped_mm"](self, hidden_states, top_k_index, top_k_weights)


# Registered globally, like transformers' own implementations: `experts_implementation="sorted_mm"` then works for
# every model whose experts use `@use_experts_implementation`, and both names appear in the list of valid ones.
ALL_EXPERTS_FUNCTIONS.register("sorted_mm", sorted_mm_experts_forward)
ALL_EXPERTS_FUNCTIONS.register("by_device", by_device_experts_forward)


class SwitchSparseBlock(nn.Module):
    """The Switch feed-forward block: route every token, enforce expert capacity, run the feed-forward experts."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.router = SwitchRouter(config)
        self.experts = SwitchExperts(config)

    def forward(self, hidden_states: torch.Tensor, token_mask: torch.Tensor) -> tuple[torch.Tensor, LayerRouting]:
        """
        Args:
            hidden_states: (b, s, h).
            token_mask: (b, s) bool, False for padding.
        Returns:
            The block's output (b, s, h), zero for dropped and padding tokens, and the block's routing.
        """
        tokens = hidden_states.reshape(-1, hidden_states.shape[-1])  # (t, h)
        _, pairs, routing = self.router(hidden_states, token_mask)
        # The experts receive only the kept pairs, never the (tokens, k) routing with dropped pairs marked: transformers'
        # own `grouped_mm` and `batched_mm` skip out-of-range expert ids only under expert parallelism.
        # Top-1 token choice with no token dropped and no padding (dropless evaluation, most batches): the pairs are
        # the tokens in order, so the gather and the scatter back would only copy. (Expert choice lists its pairs by
        # expert, and a token may have several.)
        router = self.router
        every_token_once = (
            router.router_type == "token_choice" and router.top_k == 1 and pairs.token.shape[0] == tokens.shape[0]
        )
        expert_output = self.experts(
            tokens if every_token_once else tokens.index_select(0, pairs.token),
            pairs.expert.unsqueeze(-1),
            pairs.gate.unsqueeze(-1),
        )  # (p, h)
        if every_token_once:
            return expert_output.view_as(hidden_states), routing
        output = torch.zeros_like(tokens).index_add_(0, pairs.token, expert_output)  # (t, h)
        return output.view_as(hidden_states), routing


def attend(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor, dropout: float,
    return_weights: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scaled dot-product attention of (b, heads, q, head_dim) queries over (b, heads, s, head_dim) keys and values.

    Runs `F.scaled_dot_product_attention`, which never materialises the attention probabilities. With
    `return_weights` (for `output_attentions=True`) the same computation is written out so the probabilities
    (b, heads, q, s) can be returned too; otherwise the weights are None.

    Args:
        attention_mask: (b, 1, 1, s) bool, True where a key may be attended to.
        dropout: dropout probability on the attention probabilities (0 outside training).
    Returns:
        The attended values (b, heads, q, head_dim) and the weights or None.
    """
    if not return_weights:
        attended = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout)
        return attended, None
    scores = query @ key.transpose(-1, -2) * query.shape[-1] ** -0.5  # (b, heads, q, s)
    weights = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min).softmax(dim=-1)
    return F.dropout(weights, p=dropout) @ value, weights


class SwitchAttention(nn.Module):
    """Multi-head self-attention over the whole sequence (see `attend`)."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, output_attentions: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """
        Args:
            hidden_states: (b, s, h).
            attention_mask: (b, 1, 1, s) bool, True where a key may be attended to.
            output_attentions: also return the attention probabilities.
        Returns:
            The output (b, s, h) and the attention probabilities (b, heads, s, s), or None.
        """
        batch, seq, _ = hidden_states.shape
        heads_shape = (batch, seq, self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (b, heads, s, head_dim)
        key = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (b, heads, s, head_dim)
        value = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (b, heads, s, head_dim)
        attended, weights = attend(
            query, key, value, attention_mask, self.dropout if self.training else 0.0, output_attentions
        )  # (b, heads, s, head_dim)
        attended = attended.transpose(1, 2).reshape(batch, seq, -1)  # (b, s, h)
        return self.o_proj(attended), weights


class ExpertGroups(NamedTuple):
    """Rows grouped by expert for `experts_linear`, on one of two paths.

    order: (p,) the rows that run, grouped by expert and in their original order within each expert. Then either
    rows_per_expert: how many rows each expert has, read on the host (one product per expert), or
    offsets: (e,) int32 where each expert's rows end and expert: (p,) each grouped row's expert, on the device (one
    grouped product, no host sync).
    """

    order: torch.Tensor
    rows_per_expert: list[int] | None = None
    offsets: torch.Tensor | None = None
    expert: torch.Tensor | None = None


def group_rows_by_expert(expert_ids: torch.Tensor, num_experts: int, grouped: bool) -> ExpertGroups:
    """(n,) the expert of each row -> `ExpertGroups`, for one grouped product if `grouped` (every id must then be in
    [0, num_experts): rows past the last expert's would be left unwritten), else for one product per expert."""
    if not grouped:
        return ExpertGroups(*group_by_expert(expert_ids, num_experts))
    expert, order = torch.sort(expert_ids, stable=True)  # (p,), (p,)
    # Where each expert's rows end, found on the device: bincount would read the largest id on the host first.
    offsets = torch.searchsorted(expert, torch.arange(num_experts, device=expert.device), right=True, out_int32=True)
    return ExpertGroups(order, offsets=offsets, expert=expert)


def experts_linear(
    input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: ExpertGroups
) -> torch.Tensor:
    """`output[rows of expert i] = input[rows of expert i] @ weight[i].T + bias[i]` for `input` (p, in) grouped by
    `groups`, `weight` (e, out, in) and `bias` (e, out) or None: `sorted_linear` on the per-expert path, one grouped
    product (`F.grouped_mm`) on the grouped path. (p, out)."""
    if groups.rows_per_expert is not None:
        return sorted_linear(input, weight, bias, groups.rows_per_expert, False)
    # grouped_mm is not on autocast's list: cast as autocast casts a product, so that both paths compute alike.
    # transformers' dispatcher runs torch's grouped product, or, in compiled code outside bfloat16 (which inductor's
    # grouped product does not take), its own traceable per-group loop.
    dtype = _autocast_dtype(input.device.type) or weight.dtype
    output = _grouped_mm(input.to(dtype), weight.to(dtype).transpose(1, 2), offs=groups.offsets)  # (p, out)
    if bias is not None:  # grouped_mm takes no per-group bias: gather one per row
        output = output + bias.to(dtype).index_select(0, groups.expert)
    return output


def _grouped_products_run(input: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the attention experts' projections run as one grouped product rather than one product per expert.

    On CUDA, where the per-expert loop costs a host sync (reading the row counts) and a launch per expert and
    projection: where torch has `F.grouped_mm`, on compute capability 8.0 or higher, in bfloat16 (its grouped
    kernel) or float32 (torch's loop over the groups), and rows of whole 16-byte blocks, as the grouped kernel reads
    them; float16 needs cuBLASLt's grouped GEMM, so it runs per expert. On the CPU, one BLAS product per expert is as
    fast and needs no alignment. Code compiled with `torch.compile` always takes the grouped product, on any device:
    the per-expert loop reads the row counts on the host, a graph break.
    """
    if torch.compiler.is_compiling():
        return True  # the per-expert loop's host-side row counts would be a graph break
    if input.device.type != "cuda" or not hasattr(F, "grouped_mm"):
        return False
    dtype = _autocast_dtype("cuda") or weight.dtype
    if dtype not in (torch.bfloat16, torch.float32):
        return False
    if torch.cuda.get_device_capability(input.device) < (8, 0):
        return False
    return all(size * dtype.itemsize % 16 == 0 for size in weight.shape[1:])


class SwitchAttentionExperts(nn.Module):
    """Multi-head self-attention whose query and output projections are experts: a mixture of attention heads.

    Follows "Mixture of Attention Heads" (MoA; Zhang et al., 2022, EMNLP): the router picks each token's expert(s),
    the token's query comes from its expert's query projection and its output goes through the same expert's output
    projection, scaled by the gate; keys and values are shared by all experts and computed for every token. So every
    token still attends to the whole sequence, and a token costs what it costs in one dense attention layer of the
    same size (an expert here is a full multi-head query/output pair, `hidden -> hidden`). SwitchHead (Csordas et
    al., 2023) routes the value and output projections instead; MoA's choice keeps the shared K/V cache.

    Routing, capacity, dropping, jitter and aux losses are [`SwitchRouter`]'s, as for the feed-forward experts. A
    token dropped for lack of capacity gets no query and a zero output (the residual carries it), yet it is still a
    key and a value for the others. Padding is neither routed nor attended to.

    With one expert, this is exactly [`SwitchAttention`] with `q_proj`/`o_proj` = expert 0's weights.
    """

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.num_experts = config.num_experts
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.dropout = config.attention_dropout
        hidden = config.hidden_size
        self.router = SwitchRouter(config)
        self.q_proj = nn.Parameter(torch.empty(self.num_experts, hidden, hidden))  # (e, out, in)
        self.q_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden))
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.o_proj = nn.Parameter(torch.empty(self.num_experts, hidden, hidden))  # (e, out, in)
        self.o_proj_bias = nn.Parameter(torch.empty(self.num_experts, hidden))

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        token_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, LayerRouting]:
        """
        Args:
            hidden_states: (b, s, h).
            attention_mask: (b, 1, 1, s) bool, True where a key may be attended to.
            token_mask: (b, s) bool, False for padding.
            output_attentions: also return the attention probabilities.
        Returns:
            The attention output (b, s, h), zero for dropped and padding tokens; the attention probabilities
            (b, heads, k * s, s), row `c * s + i` for choice c of token i (zero rows for dropped or padding queries),
            or None; and the routing. k is `top_k` with token choice; with expert choice, the most experts one token
            got in this batch (its choices numbered in increasing expert order).
        """
        batch, seq, hidden = hidden_states.shape
        tokens = hidden_states.reshape(-1, hidden)  # (t, h)
        num_tokens = tokens.shape[0]
        _, pairs, routing = self.router(hidden_states, token_mask)
        choices = pairs.choices_per_token
        groups = group_rows_by_expert(pairs.expert, self.num_experts, _grouped_products_run(tokens, self.q_proj))
        order = groups.order  # pairs grouped by expert
        token = pairs.token[order]  # (p,)
        # Each (token, choice) pair is its own query. Its slot in a (b, k, s) layout makes each sequence's k*s
        # queries contiguous, so they attend to that sequence's s keys with no reshuffling.
        sequence, position = pairs.token.div(seq, rounding_mode="floor"), pairs.token.remainder(seq)
        slot = ((sequence * choices + pairs.choice) * seq + position)[order]  # (p,)

        # Every token kept with all its choices (dropless, no padding): the slots are a permutation of all queries.
        every_pair_kept = slot.shape[0] == choices * num_tokens
        unsort = inverse_permutation(slot) if every_pair_kept else None

        pair_queries = experts_linear(tokens.index_select(0, token), self.q_proj, self.q_proj_bias, groups)  # (p, h)
        if every_pair_kept:
            queries = pair_queries.index_select(0, unsort)  # (k*t, h)
        else:
            queries = tokens.new_zeros(choices * num_tokens, hidden).index_copy(0, slot, pair_queries)
        queries = queries.view(batch, choices * seq, self.num_heads, self.head_dim).transpose(1, 2)
        heads_shape = (batch, seq, self.num_heads, self.head_dim)
        keys = self.k_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (b, heads, s, head_dim)
        values = self.v_proj(hidden_states).view(heads_shape).transpose(1, 2)  # (b, heads, s, head_dim)
        attended, weights = attend(
            queries, keys, values, attention_mask, self.dropout if self.training else 0.0, output_attentions
        )  # (b, heads, k*s, head_dim)
        attended = attended.transpose(1, 2).reshape(choices * num_tokens, hidden)  # (k*t, h) in slot order

        pair_output = experts_linear(attended.index_select(0, slot), self.o_proj, self.o_proj_bias, groups)  # (p, h)
        gates = pairs.gate.new_zeros(num_tokens, choices)  # (t, k), read only where a pair was kept
        gates[pairs.token, pairs.choice] = pairs.gate
        pair_id = token * choices + pairs.choice[order]  # (p,) the (token, choice) behind each sorted pair
        output = combine_expert_outputs(pair_output, pair_id, gates)  # (t, h)
        return output.view_as(hidden_states), weights, routing


class SwitchFeedForward(nn.Module):
    """Dense feed-forward block (h -> expert_intermediate_size -> h), the size of one expert: the feed-forward
    sublayer of a layer that routes only its attention."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.expert_intermediate_size)
        self.act_fn = ACT2FN[config.expert_hidden_act]
        self.down_proj = nn.Linear(config.expert_intermediate_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(b, s, h) -> (b, s, h)."""
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class SwitchLayer(GradientCheckpointingLayer):
    """Pre-LayerNorm transformer layer, with experts where `config.expert_kinds[layer_index]` says:

    - "feed_forward": dense attention, then a Switch MoE feed-forward block (the Switch paper);
    - "attention": attention experts ([`SwitchAttentionExperts`]), then a dense feed-forward block;
    - "both": attention experts, then a Switch MoE feed-forward block;
    - "dense": dense attention, then one dense feed-forward block of an expert's size and no router (the dense twin
      of a "feed_forward" layer: the same computation per token).
    """

    def __init__(self, config: SwitchConfig, layer_index: int):
        super().__init__()
        kind = config.expert_kinds[layer_index]
        self.routes_attention = kind in ("attention", "both")
        self.routes_feed_forward = kind in ("feed_forward", "both")
        self.is_dense = kind == "dense"
        self.attention_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = SwitchAttentionExperts(config) if self.routes_attention else SwitchAttention(config)
        if self.routes_feed_forward:
            self.moe_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.moe = SwitchSparseBlock(config)
        else:
            self.mlp_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
            self.mlp = SwitchFeedForward(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
        token_mask: torch.Tensor,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """
        Args:
            hidden_states: (b, s, h).
            attention_mask: (b, 1, 1, s) bool, True where a key may be attended to.
            token_mask: (b, s) bool, False for padding.
            output_attentions: have the attention return its probabilities (recorded by `SwitchModel`).
        Returns:
            The layer's output (b, s, h), then the fields of each of its routers' [`LayerRouting`], attention router
            first, all in one flat tuple of tensors: reentrant gradient checkpointing differentiates only the
            tensors a layer returns at the top level, so the router losses must not travel in a nested structure.
            `LayerRouting.regroup` undoes the flattening.
        """
        routings = []
        normed = self.attention_norm(hidden_states)
        if self.routes_attention:
            attention_output, _, routing = self.attention(normed, attention_mask, token_mask, output_attentions)
            routings.append(routing)
        else:
            attention_output, _ = self.attention(normed, attention_mask, output_attentions)
        hidden_states = hidden_states + self.dropout(attention_output)

        if self.routes_feed_forward:
            feed_forward_output, routing = self.moe(self.moe_norm(hidden_states), token_mask)
            routings.append(routing)
        else:
            feed_forward_output = self.mlp(self.mlp_norm(hidden_states))
        # A dropped token's expert output is zero: the residual carries it through unchanged.
        return hidden_states + self.dropout(feed_forward_output), *(field for routing in routings for field in routing)


@dataclass
class SwitchModelOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
        Output of the last Switch layer, after the final LayerNorm.
    hidden_states (`tuple(torch.FloatTensor)`, *optional*, returned with `output_hidden_states`):
        The backbone's output (zero at padding positions) followed by each Switch layer's output, each
        `(batch_size, sequence_length, hidden)`; the last is `last_hidden_state` (after the final LayerNorm), as in
        transformers' other models.
        `output_hidden_states` may also be a list of indices (e.g. `[0, -1]`): the others are then None.
    attentions (`tuple(torch.FloatTensor)`, *optional*, returned with `output_attentions=True`):
        Each Switch layer's attention probabilities, `(batch_size, num_heads, sequence_length, sequence_length)`;
        `(batch_size, num_heads, top_k * sequence_length, sequence_length)` for attention experts (one query per
        choice).
    router_logits (`tuple(torch.FloatTensor)`, *optional*, returned with `output_router_logits=True`):
        Each router's logits, `(batch_size, sequence_length, num_experts)`, in float32. There is one router per
        Switch layer, two in a layer of kind "both"; `config.router_names` names them in this order.
    expert_indices (`tuple(torch.LongTensor)`, returned with `output_routing`):
        Each router's chosen experts. With token choice, `(batch_size, sequence_length, top_k)`; -1 where a token was
        dropped for lack of capacity or is padding. With expert choice, `(batch_size, sequence_length, num_experts)`:
        the experts that took each token, in increasing order, then -1 (all -1 for a token no expert took, and for
        padding).
    tokens_per_expert (`torch.FloatTensor` of shape `(num_routers, num_experts)`, returned with `output_routing`):
        How many tokens each expert of each router processed.
    dropped_fraction (`torch.FloatTensor` of shape `(num_routers,)`, returned with `output_routing`):
        Per router, with token choice the fraction of the real tokens' routing choices dropped for lack of capacity;
        with expert choice the fraction of the real tokens that no expert took.
    load_balancing_loss (`torch.FloatTensor` of shape `()`, returned with `output_routing`):
        Mean over routers of the Switch load-balancing loss (1.0 for a perfectly uniform router; 0 with expert
        choice, whose experts take equal loads by construction).
    router_z_loss (`torch.FloatTensor` of shape `()`, returned with `output_routing`):
        Mean over routers of the router z-loss.
    """

    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None
    tokens_per_expert: torch.FloatTensor | None = None
    dropped_fraction: torch.FloatTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None


@dataclass
class SwitchTokenReconstructionOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given):
        `reconstruction_loss + aux_loss`, the loss to train on.
    logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`):
        Token logits; `argmax` then `tokenizer.decode` gives the reconstructed text.
    reconstruction_loss (`torch.FloatTensor` of shape `()`, returned when `labels` are given):
        Token cross-entropy over the positions whose label is not -100.
    aux_loss (`torch.FloatTensor` of shape `()`, returned with `output_routing`):
        `router_aux_loss_coef * load_balancing_loss + router_z_loss_coef * router_z_loss`.
    load_balancing_loss, router_z_loss, hidden_states, attentions, router_logits, expert_indices, tokens_per_expert,
    dropped_fraction:
        As in [`SwitchModelOutput`].
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    load_balancing_loss: torch.FloatTensor | None = None
    router_z_loss: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None
    expert_indices: tuple[torch.LongTensor, ...] | None = None
    tokens_per_expert: torch.FloatTensor | None = None
    dropped_fraction: torch.FloatTensor | None = None


class SwitchPreTrainedModel(PreTrainedModel):
    config_class = SwitchConfig
    config: SwitchConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["SwitchLayer", "BertLayer", "BertEmbeddings"]
    _supports_sdpa = True
    # Selective precision (Fedus et al., 2021): the routers stay float32 when the model is loaded in bfloat16 or
    # float16; they compute in `router_dtype` whatever the weights' dtype.
    _keep_in_fp32_modules_strict = ["router"]
    # What `output_hidden_states`, `output_attentions` and `output_router_logits` return, recorded by hooks on these
    # modules' outputs (transformers' `capture_outputs`).
    _can_record_outputs = {
        "hidden_states": OutputRecorder(SwitchLayer, index=0),
        "attentions": [OutputRecorder(SwitchAttention, index=1), OutputRecorder(SwitchAttentionExperts, index=1)],
        "router_logits": OutputRecorder(SwitchRouter, index=0),
    }

    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.initializer_range
        if isinstance(module, SwitchExperts):
            init.normal_(module.up_proj, mean=0.0, std=std)
            init.zeros_(module.up_proj_bias)
            init.normal_(module.down_proj, mean=0.0, std=std)
            init.zeros_(module.down_proj_bias)
        elif isinstance(module, SwitchAttentionExperts):
            init.normal_(module.q_proj, mean=0.0, std=std)
            init.zeros_(module.q_proj_bias)
            init.normal_(module.o_proj, mean=0.0, std=std)
            init.zeros_(module.o_proj_bias)
        elif isinstance(module, SwitchRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias_update_rate > 0:
                init.zeros_(module.expert_bias)
                init.zeros_(module.pending_load)

    def get_correct_experts_implementation(self, requested_experts: str | None) -> str:
        """transformers defaults to `grouped_mm`, whose CPU path is slower than `sorted_mm`; switch-hf defaults to
        `by_device`, which picks between the two at each call from where the tensors are (see
        `by_device_experts_forward`), whatever devices the machine has. An explicit choice is kept, and an unknown one
        still fails with the list of valid names."""
        if requested_experts is None:
            requested_experts = "by_device"
        return super().get_correct_experts_implementation(requested_experts)

    def _check_and_adjust_experts_implementation(self, experts_implementation: str | None) -> str:
        # Only the Switch layers have experts. transformers copies a requested implementation into every sub-config,
        # and BertModel, built from `backbone_config` right after this check, rejects "grouped_mm": keep the
        # backbone on its default.
        backbone_config = getattr(self.config, "backbone_config", None)
        if backbone_config is not None:
            backbone_config._experts_implementation_internal = None
        return super()._check_and_adjust_experts_implementation(experts_implementation)

    def update_router_biases(self):
        """Auxiliary-loss-free load balancing (`config.router_bias_update_rate > 0`): moves each router's expert bias by
        the rate times `sign(mean load - expert load)`, the load being the routing choices of the training batches
        backpropagated since the last call, and starts a new count. Call it after each optimizer step (with
        gradient accumulation, the count spans the step's micro-batches); with `Trainer`, pass
        `switch_hf.RouterBiasUpdateCallback()` in its callbacks. Under `torch.distributed`, every process must call it:
        the loads are summed over the processes first, so that every copy of a router moves its bias alike. Does
        nothing when the rate is 0."""
        biased = [router for router in self.modules() if isinstance(router, SwitchRouter) and router.bias_update_rate > 0]
        if not biased:
            return
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            loads = torch.stack([router.pending_load for router in biased])  # (routers, e), one collective
            torch.distributed.all_reduce(loads)
            for router, load in zip(biased, loads):
                router.pending_load.copy_(load)
        for router in biased:
            router.update_bias()

    def _wants_router_logits(self, kwargs: dict) -> bool:
        requested = kwargs.get("output_router_logits")
        return bool(requested if requested is not None else self.config.output_router_logits)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, strict: bool | None = None, **kwargs):
        """`PreTrainedModel.from_pretrained`, with these guarantees:

        - weights come from safetensors only: a checkpoint that has only pickle weights (`pytorch_model.bin`) fails
          with a clear error instead of being unpickled, unless the caller passes `use_safetensors=False`;
        - a weight of the base model that the checkpoint lacks (say, a config naming more Switch layers than the
          weights hold) fails the load instead of being initialised at random; `strict=False` accepts that
          (transformers' load report names the weights), and `strict=True` also fails on a missing head, unexpected
          weights or weights of another shape. A head missing from a base model's checkpoint is initialised at
          random, as in transformers, with its load report;
        - a weight holding NaN or infinite values is named in a warning.
        """
        if kwargs.get("use_safetensors") is None:
            kwargs["use_safetensors"] = True
        wants_loading_info = kwargs.pop("output_loading_info", False)
        try:
            model, loading_info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except OSError as error:
            if kwargs["use_safetensors"] and "safetensors" in str(error):
                raise OSError(
                    f"{pretrained_model_name_or_path} has no safetensors weights (model.safetensors or "
                    "model.safetensors.index.json). Switch checkpoints load from safetensors only, never by "
                    "unpickling pytorch_model.bin; pass use_safetensors=False to load a pickle you trust."
                ) from error
            raise
        problems = {
            "missing": sorted(loading_info["missing_keys"]),
            "unexpected": sorted(loading_info["unexpected_keys"]),
            "mismatched": sorted(key for key, *_ in loading_info["mismatched_keys"]),
        }
        if strict:
            failing = problems
        elif strict is None:
            # A task head missing from a base model's checkpoint is the usual start of fine-tuning; a missing
            # backbone or Switch weight means the checkpoint does not hold the model its config describes.
            base_prefix = "" if model.base_model is model else f"{cls.base_model_prefix}."
            failing = {"missing": [key for key in problems["missing"] if key.startswith(base_prefix)]}
        else:
            failing = {}
        if any(failing.values()):
            listed = "; ".join(f"{kind}: {', '.join(keys)}" for kind, keys in failing.items() if keys)
            hint = "" if strict else " (pass strict=False to initialise the missing weights at random)"
            raise ValueError(f"loading {pretrained_model_name_or_path} failed; {listed}{hint}")
        non_finite = [
            name
            for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all()
        ]
        if non_finite:
            logger.warning("%s has weights holding NaN or infinite values: %s", pretrained_model_name_or_path, non_finite)
        return (model, loading_info) if wants_loading_info else model

    @classmethod
    def from_backbone(
        cls,
        backbone_name_or_path,
        config: SwitchConfig | None = None,
        upcycle_experts: bool = False,
        **backbone_kwargs,
    ):
        """A new model whose backbone holds the pretrained BERT at `backbone_name_or_path`; the Switch layers and
        the head are initialised at random (the head's decoder stays tied to the backbone's word embeddings).

        Args:
            backbone_name_or_path: a directory or Hub id of a BERT checkpoint (`BertModel.from_pretrained`).
            config: the Switch configuration; its `backbone_config` is replaced by the checkpoint's, which must agree
                on `hidden_size` and `vocab_size`. Defaults to `SwitchConfig()`. The caller's config is not changed.
            upcycle_experts: start every expert as a copy of the backbone's last feed-forward block instead of at
                random (sparse upcycling, Komatsuzaki et al., 2022). Needs `expert_intermediate_size` equal to the
                backbone's `intermediate_size` and the same activation.
            backbone_kwargs: passed to `BertModel.from_pretrained`.
        """
        backbone = _BertWithoutPooler.from_pretrained(backbone_name_or_path, add_pooling_layer=False, **backbone_kwargs)
        config = config if config is not None else SwitchConfig()
        for field in ("hidden_size", "vocab_size"):
            ours, theirs = getattr(config.backbone_config, field), getattr(backbone.config, field)
            if ours != theirs:
                raise ValueError(
                    f"config.backbone_config.{field} is {ours} but the backbone at {backbone_name_or_path!r} has "
                    f"{field}={theirs}"
                )
        config_dict = config.to_dict()
        config_dict["backbone_config"] = backbone.config.to_dict()
        model = cls(SwitchConfig.from_dict(config_dict))
        model.base_model.backbone.load_state_dict(backbone.state_dict())
        if upcycle_experts:
            model.base_model.upcycle_experts_from_backbone()
        return model


class _BertWithoutPooler(BertModel):
    """The backbone as `from_backbone` reads a BERT checkpoint: the Switch layers read the token states, so the
    checkpoint's pooler weights go unused by design, not by mistake worth a load report."""

    _keys_to_ignore_on_load_unexpected = [r"^pooler\."]


class SwitchModel(SwitchPreTrainedModel):
    """BERT backbone -> `num_switch_layers` Switch layers -> LayerNorm."""

    # A full model's checkpoint also holds its vocabulary head, which this base model has no use for.
    _keys_to_ignore_on_load_unexpected = [r"^head\."]

    def __init__(self, config: SwitchConfig):
        super().__init__(config)
        self.backbone = BertModel(config.backbone_config, add_pooling_layer=False)
        self.layers = nn.ModuleList([SwitchLayer(config, index) for index in range(config.num_switch_layers)])
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False
        self.post_init()
        if config.freeze_backbone:
            self.backbone.requires_grad_(False)

    def get_input_embeddings(self):
        return self.backbone.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.backbone.set_input_embeddings(value)

    @torch.no_grad()
    def upcycle_experts_from_backbone(self):
        """Start every expert from the backbone's last layer (sparse upcycling, Komatsuzaki et al., 2022): each
        feed-forward expert as a copy of its feed-forward block, each attention expert's query and output
        projections (and the shared keys and values) as copies of its self-attention; a dense layer's feed-forward
        block as a copy too. Training starts from known-good weights, and the routers learn to tell the copies
        apart."""
        if len(self.backbone.encoder.layer) == 0:
            raise ValueError("upcycling copies the backbone's last layer, but the backbone has num_hidden_layers=0")
        last_layer = self.backbone.encoder.layer[-1]
        if any(layer.routes_feed_forward or layer.is_dense for layer in self.layers):
            if self.config.expert_intermediate_size != self.config.backbone_config.intermediate_size:
                raise ValueError(
                    f"upcycling needs expert_intermediate_size ({self.config.expert_intermediate_size}) equal to the "
                    f"backbone's intermediate_size ({self.config.backbone_config.intermediate_size})"
                )
            if self.config.expert_hidden_act != self.config.backbone_config.hidden_act:
                raise ValueError(
                    f"upcycling needs expert_hidden_act ({self.config.expert_hidden_act!r}) equal to the backbone's "
                    f"hidden_act ({self.config.backbone_config.hidden_act!r})"
                )
        if any(layer.routes_attention for layer in self.layers) and (
            self.config.num_attention_heads != self.config.backbone_config.num_attention_heads
        ):
            raise ValueError(
                f"upcycling attention experts needs num_attention_heads ({self.config.num_attention_heads}) equal to "
                f"the backbone's ({self.config.backbone_config.num_attention_heads})"
            )

        def copy_into_experts(stacked: nn.Parameter, dense: torch.Tensor):
            stacked.copy_(dense.expand_as(stacked))

        for layer in self.layers:
            if layer.routes_feed_forward:
                experts = layer.moe.experts
                copy_into_experts(experts.up_proj, last_layer.intermediate.dense.weight)
                copy_into_experts(experts.up_proj_bias, last_layer.intermediate.dense.bias)
                copy_into_experts(experts.down_proj, last_layer.output.dense.weight)
                copy_into_experts(experts.down_proj_bias, last_layer.output.dense.bias)
            if layer.is_dense:
                layer.mlp.up_proj.load_state_dict(last_layer.intermediate.dense.state_dict())
                layer.mlp.down_proj.load_state_dict(last_layer.output.dense.state_dict())
            if layer.routes_attention:
                attention, dense_attention = layer.attention, last_layer.attention
                copy_into_experts(attention.q_proj, dense_attention.self.query.weight)
                copy_into_experts(attention.q_proj_bias, dense_attention.self.query.bias)
                copy_into_experts(attention.o_proj, dense_attention.output.dense.weight)
                copy_into_experts(attention.o_proj_bias, dense_attention.output.dense.bias)
                attention.k_proj.load_state_dict(dense_attention.self.key.state_dict())
                attention.v_proj.load_state_dict(dense_attention.self.value.state_dict())

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_backbone:
            # A frozen backbone is a fixed feature extractor: its dropout would only add noise to the features.
            self.backbone.eval()
        return self

    @capture_outputs
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        backbone_hidden_states: torch.FloatTensor | None = None,
        output_routing: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SwitchModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`):
                Token ids; the backbone turns them into hidden states. Give these or `backbone_hidden_states`.
            attention_mask (`torch.Tensor` of shape `(batch_size, sequence_length)`, *optional*):
                1 for real tokens, 0 for padding. Padding is never attended to, routed, or counted in the losses.
            token_type_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Segment ids for the backbone.
            backbone_hidden_states (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
                Precomputed backbone output (e.g. `BertModel(...).last_hidden_state`), used instead of `input_ids`.
            output_hidden_states (`bool` or `list[int]`, *optional*): return the backbone's and every Switch layer's
                output, or those at the given indices.
            output_attentions (`bool`, *optional*): return every Switch layer's attention probabilities.
            output_router_logits (`bool`, *optional*): return every router's logits.
            output_routing (`bool`, *optional*): return the routing outputs (`expert_indices`, `tokens_per_expert`,
                `dropped_fraction`, `load_balancing_loss`, `router_z_loss`). Defaults to True in training mode or
                with `output_router_logits`, False otherwise: an inference output then holds only per-example
                tensors, which is what transformers' pipelines split a batch into.
            return_dict (`bool`, *optional*): return a [`SwitchModelOutput`] (the default) or a tuple.
        """
        unexpected = sorted(set(kwargs) - {"output_hidden_states", "output_attentions", "output_router_logits"})
        if unexpected:
            raise TypeError(f"SwitchModel.forward got unexpected arguments: {unexpected}")
        if output_routing is None:
            output_routing = self.training or self._wants_router_logits(kwargs)
        output_attentions = kwargs.get("output_attentions")
        output_attentions = output_attentions if output_attentions is not None else self.config.output_attentions
        # The Switch layers' attention runs `F.scaled_dot_product_attention`, or, where the probabilities are wanted
        # or `attn_implementation="eager"` asks for it, the same computation written out.
        explicit_attention = output_attentions or self.config._attn_implementation == "eager"

        hidden_states, token_mask = self._embed(input_ids, attention_mask, token_type_ids, backbone_hidden_states)
        attention_mask = token_mask[:, None, None, :]  # (b, 1, 1, s) keys each query may attend to
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and not hidden_states.requires_grad:
            # Reentrant checkpointing differentiates a layer only through inputs that require grad: behind a frozen
            # backbone (or precomputed hidden states) none does, and the first layer's weights would get no gradient.
            hidden_states = hidden_states.detach().requires_grad_()

        routings = []
        for layer in self.layers:
            hidden_states, *routing_fields = layer(
                hidden_states, attention_mask, token_mask, output_attentions=explicit_attention
            )
            routings.extend(LayerRouting.regroup(routing_fields))
        hidden_states = self.norm(hidden_states)

        batch, seq, _ = hidden_states.shape
        # With the layers spread over several devices (`device_map`), each router's statistics live on its layer's.
        device = hidden_states.device

        def stacked(field: str, shape: tuple[int, ...]) -> torch.Tensor:
            if not routings:  # every layer dense: torch.stack refuses an empty list
                return torch.zeros((0, *shape), device=device)
            return torch.stack([getattr(routing, field).to(device) for routing in routings])  # (routers, ...)

        def mean_loss(field: str) -> torch.Tensor:
            # With no router there is nothing to balance: the losses are 0, not the NaN mean of nothing.
            return stacked(field, ()).mean() if routings else torch.zeros((), device=device)

        if not output_routing:
            return SwitchModelOutput(last_hidden_state=hidden_states)
        return SwitchModelOutput(
            last_hidden_state=hidden_states,
            expert_indices=tuple(routing.expert_index.view(batch, seq, -1) for routing in routings),
            tokens_per_expert=stacked("tokens_per_expert", (self.config.num_experts,)),
            dropped_fraction=stacked("dropped_fraction", ()),
            load_balancing_loss=mean_loss("load_balancing_loss"),
            router_z_loss=mean_loss("z_loss"),
        )

    def _embed(self, input_ids, attention_mask, token_type_ids, backbone_hidden_states):
        """Checks the inputs and returns the backbone's hidden states (b, s, h) and the token mask (b, s) bool."""
        if (input_ids is None) == (backbone_hidden_states is None):
            raise ValueError("Pass exactly one of `input_ids` or `backbone_hidden_states`, not both and not neither.")
        if input_ids is not None:
            if input_ids.dim() != 2:
                raise ValueError(f"`input_ids` must be (batch_size, sequence_length), got shape {tuple(input_ids.shape)}")
            if input_ids.dtype not in (torch.int64, torch.int32):
                raise ValueError(f"`input_ids` must hold integer token ids, got dtype {input_ids.dtype}")
            # Reading the ids' range waits for the data; a compiled graph cannot, and skips this check.
            checks_values = input_ids.numel() and not torch.compiler.is_compiling()
            if checks_values and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
                raise ValueError(
                    f"`input_ids` must be in [0, {self.config.vocab_size - 1}] (the vocabulary), got values from "
                    f"{input_ids.min().item()} to {input_ids.max().item()}"
                )
            if input_ids.shape[1] > self.config.max_position_embeddings:
                raise ValueError(
                    f"`input_ids` has {input_ids.shape[1]} tokens per sequence but the backbone accepts at most "
                    f"max_position_embeddings={self.config.max_position_embeddings}; truncate the input "
                    f"(tokenizer(..., truncation=True))"
                )
            batch_shape = tuple(input_ids.shape)
        else:
            if backbone_hidden_states.dim() != 3 or backbone_hidden_states.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"`backbone_hidden_states` must be (batch_size, sequence_length, hidden_size={self.config.hidden_size}),"
                    f" got shape {tuple(backbone_hidden_states.shape)}"
                )
            if not backbone_hidden_states.is_floating_point():
                raise ValueError(
                    f"`backbone_hidden_states` must be floating point, got dtype {backbone_hidden_states.dtype}"
                )
            batch_shape = tuple(backbone_hidden_states.shape[:2])
            if token_type_ids is not None:
                raise ValueError("`token_type_ids` is for the backbone; it cannot apply to `backbone_hidden_states`.")
        if 0 in batch_shape:
            raise ValueError(
                f"the input is empty: (batch_size, sequence_length)={batch_shape}; give at least one sequence of at "
                "least one token"
            )
        if token_type_ids is not None:
            self._check_token_type_ids(token_type_ids, batch_shape)

        if attention_mask is None:
            inputs = input_ids if input_ids is not None else backbone_hidden_states
            token_mask = torch.ones(batch_shape, dtype=torch.bool, device=inputs.device)
        elif tuple(attention_mask.shape) != batch_shape:
            raise ValueError(
                f"`attention_mask` must have shape (batch_size, sequence_length)={batch_shape}, "
                f"got {tuple(attention_mask.shape)}"
            )
        else:
            token_mask = attention_mask.bool()

        if backbone_hidden_states is not None:
            # Precomputed features may come in another precision (float64 from numpy, say): the layers run in theirs.
            hidden_states = backbone_hidden_states.to(self.norm.weight.dtype)
            if not torch.compiler.is_compiling() and not torch.isfinite(hidden_states[token_mask]).all():
                raise ValueError("`backbone_hidden_states` holds NaN or infinite values at real (unmasked) tokens")
        else:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_backbone):
                hidden_states = self.backbone(
                    input_ids=input_ids, attention_mask=token_mask.long(), token_type_ids=token_type_ids
                ).last_hidden_state
        # Padding is never attended to, but attention multiplies its values by a zero probability, and 0 * NaN is NaN:
        # whatever a padding position holds must not reach the real tokens.
        return hidden_states.masked_fill(~token_mask[..., None], 0.0), token_mask

    def _check_token_type_ids(self, token_type_ids: torch.Tensor, batch_shape: tuple[int, int]):
        if tuple(token_type_ids.shape) != batch_shape:
            raise ValueError(
                f"`token_type_ids` must have shape (batch_size, sequence_length)={batch_shape}, "
                f"got {tuple(token_type_ids.shape)}"
            )
        if token_type_ids.is_floating_point() or token_type_ids.is_complex():
            raise ValueError(f"`token_type_ids` must hold integer segment ids, got dtype {token_type_ids.dtype}")
        segments = self.config.backbone_config.type_vocab_size
        if not torch.compiler.is_compiling() and (token_type_ids.min() < 0 or token_type_ids.max() >= segments):
            raise ValueError(
                f"`token_type_ids` must be in [0, {segments - 1}] (the backbone's type_vocab_size={segments}), got "
                f"values from {token_type_ids.min().item()} to {token_type_ids.max().item()}"
            )


class SwitchReconstructionHead(nn.Module):
    """BERT-style prediction head: dense -> activation -> LayerNorm -> vocabulary projection."""

    def __init__(self, config: SwitchConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.act_fn = ACT2FN[config.backbone_config.hidden_act]
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """(..., h) -> logits (..., v)."""
        return self.decoder(self.norm(self.act_fn(self.dense(hidden_states))))


class SwitchForTokenReconstruction(SwitchPreTrainedModel):
    """[`SwitchModel`] with a vocabulary head (tied to the backbone's word embeddings) that reconstructs tokens.

    Serves fill-mask too: a `[MASK]` position's logits rank the candidate tokens.
    """

    _tied_weights_keys = {"head.decoder.weight": "model.backbone.embeddings.word_embeddings.weight"}

    def __init__(self, config: SwitchConfig):
        super().__init__(config)
        self.model = SwitchModel(config)
        self.head = SwitchReconstructionHead(config)
        self.post_init()

    def get_output_embeddings(self):
        return self.head.decoder

    def set_output_embeddings(self, new_embeddings):
        self.head.decoder = new_embeddings

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.LongTensor | None = None,
        backbone_hidden_states: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        only_labeled_logits: bool = False,
        output_routing: bool | None = None,
        return_dict: bool | None = None,
        num_items_in_batch: int | torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SwitchTokenReconstructionOutput | tuple:
        r"""
        Args:
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
                Target token ids; -100 marks positions without a loss. With labels, `loss` is the token cross-entropy
                plus the weighted router losses.
            only_labeled_logits (`bool`, defaults to `False`):
                Run the vocabulary head only where `labels` is not -100; `logits` is then `(num_labeled, vocab_size)`
                in row-major position order. The head dominates the cost of a training step, and most positions of
                a masked-token objective carry no loss.
            num_items_in_batch (`int`, *optional*):
                Labelled tokens in the whole (gradient-accumulated) batch, as `Trainer` passes it. Trainer then adds
                the micro-batches' losses without dividing them, so each part is scaled to its share of the whole
                batch: the cross-entropy is summed and divided by `num_items_in_batch`, and the router losses (means
                over this micro-batch) are weighted by this micro-batch's labelled tokens over `num_items_in_batch`.
                Accumulated steps then train as one step on the whole batch would.
            output_routing (`bool`, *optional*):
                Return the routing outputs and `aux_loss`. Defaults to True in training mode, with `labels` or with
                `output_router_logits`, False otherwise (see [`SwitchModel.forward`]). With `labels`, `loss` holds
                the router losses either way.
            Other arguments (`output_hidden_states`, `output_attentions`, `output_router_logits`): as in
                [`SwitchModel.forward`].
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if output_routing is None:
            output_routing = self.training or labels is not None or self._wants_router_logits(kwargs)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            backbone_hidden_states=backbone_hidden_states,
            output_routing=output_routing or labels is not None,
            return_dict=True,
            **kwargs,
        )
        batch_shape = tuple(outputs.last_hidden_state.shape[:2])
        if labels is not None and tuple(labels.shape) != batch_shape:
            raise ValueError(f"`labels` must have shape (batch_size, sequence_length)={batch_shape}, got {tuple(labels.shape)}")
        if only_labeled_logits and labels is None:
            raise ValueError("`only_labeled_logits=True` needs `labels`: it keeps the positions whose label is not -100")

        hidden_states = outputs.last_hidden_state  # (b, s, h)
        if only_labeled_logits:
            labeled = labels != -100
            hidden_states, labels = hidden_states[labeled], labels[labeled]  # (n, h), (n,)
        logits = self.head(hidden_states)  # (b, s, v), or (n, v) with only_labeled_logits
        aux_loss = None
        if outputs.load_balancing_loss is not None:
            aux_loss = (
                self.config.router_aux_loss_coef * outputs.load_balancing_loss
                + self.config.router_z_loss_coef * outputs.router_z_loss
            )

        reconstruction_loss = loss = None
        if labels is not None:
            token_losses = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1), ignore_index=-100, reduction="sum"
            )
            labeled_here = (labels != -100).sum()
            if num_items_in_batch is None:
                reconstruction_loss = token_losses / labeled_here.clamp(min=1)
                loss = reconstruction_loss + aux_loss
            else:
                reconstruction_loss = token_losses / num_items_in_batch
                loss = reconstruction_loss + aux_loss * (labeled_here / num_items_in_batch)

        routing = {
            "aux_loss": aux_loss,
            "load_balancing_loss": outputs.load_balancing_loss,
            "router_z_loss": outputs.router_z_loss,
            "expert_indices": outputs.expert_indices,
            "tokens_per_expert": outputs.tokens_per_expert,
            "dropped_fraction": outputs.dropped_fraction,
        }
        output = SwitchTokenReconstructionOutput(
            loss=loss,
            logits=logits,
            reconstruction_loss=reconstruction_loss,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **(routing if output_routing else {}),
        )
        return output if return_dict else output.to_tuple()


__all__ = ["SwitchPreTrainedModel", "SwitchModel", "SwitchForTokenReconstruction"]
