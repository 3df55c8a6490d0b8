"""Evaluate a Switch checkpoint on the held-out validation split and on any other evaluation sets.

    python scripts/evaluate.py --model runs/minilm-e8/final --output-dir runs/minilm-e8/eval
    python scripts/evaluate.py --output-dir runs/release-eval --eval-file data/eval/general_english.txt

Measures, over each set's real (non-special) tokens:
- identity reconstruction: the input is left as it is; how often the argmax token is the input token;
- masked top-1 / top-5: a seeded `--mask-probability` share of tokens is replaced by [MASK] (all of them, no random
  or kept tokens: this is what fill-mask sees); how often the original token is the first, or among the first five;
  and the masked perplexity, exp of the mean negative log-likelihood of the original tokens;
- the same with whole-word masking: `--mask-probability` of the words are masked with all their "##" pieces, so a
  word cannot be read off its own remaining pieces (`--masking` picks token, whole-word or both);
- both broken down by the kind of the token hidden: content word, function word (FUNCTION_WORDS), punctuation and
  symbols, or word piece (a "##" continuation of a longer word);
- per router, the fraction of tokens each expert receives and the fraction dropped for lack of capacity.
Writes OUTPUT_DIR/eval_results.json and OUTPUT_DIR/expert_load.png (of the validation split). The validation split's
figures are the top-level keys of eval_results.json, each `--eval-file` (plain UTF-8 text, one example per line) has
the same keys under `eval_files`, named by its file name without the extension.
"""

import argparse
import json
import logging
import math
import sys
import unicodedata
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on training machines
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from datasets import Dataset  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prepare_corpus import load_tokenized_corpus  # noqa: E402

from switch_hf.cli import RELEASED_CHECKPOINT, UsageError, load_config_and_tokenizer, load_model  # noqa: E402
from switch_hf.data import (  # noqa: E402
    check_corpus, check_max_length, check_text_file, drop_examples_without_text, word_start_positions,
)

logger = logging.getLogger("evaluate")
REPO_ROOT = Path(__file__).resolve().parent.parent

# English closed-class words: articles and determiners, pronouns, prepositions, conjunctions, auxiliary and modal
# verbs, and the pieces the tokenizer splits contractions into ("don't" -> "don", "'", "t"). They are most of what a
# model gets right by grammar alone, so masked accuracy is also reported without them.
FUNCTION_WORDS = frozenset("""
    a an the this that these those my your his her its our their whose which what whatever whichever
    some any no every each either neither both all few many much more most several such other another own
    i me myself you yourself yourselves he him himself she herself it itself we us ourselves they them themselves
    who whom whoever yours hers ours theirs
    about above across after against along amid among around as at before behind below beneath beside besides
    between beyond but by concerning despite down during except for from in inside into near of off on onto
    out outside over past per since than through throughout till to toward towards under underneath unlike until
    up upon via with within without
    and or nor so yet because although though if unless whether while whereas where when whenever wherever why how
    whereby wherein thus hence therefore then also not
    be am is are was were been being have has had having do does did doing done
    will would shall should can could may might must ought
    there here very too just only even
    don doesn didn isn aren wasn weren hasn haven hadn wouldn shan shouldn couldn mustn needn
    s t d ll m re ve
""".split())
WORD_KINDS = ("content", "function", "punctuation", "word_piece")
MASKINGS = ("token", "whole-word")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(RELEASED_CHECKPOINT), help="checkpoint directory or Hub id")
    parser.add_argument("--corpus-dir", default=str(REPO_ROOT / "data" / "corpus"))
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-examples", type=int, default=None, help="evaluate only the first N examples")
    parser.add_argument("--mask-probability", type=float, default=0.15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--masking", choices=[*MASKINGS, "both"], default="both",
                        help="mask single tokens, whole words (all their pieces), or report both (default)")
    parser.add_argument("--eval-file", type=Path, action="append", default=[], metavar="PATH",
                        help="also evaluate on this file, one example per line (repeatable)")
    args = parser.parse_args(argv)
    if not 0.0 < args.mask_probability < 1.0:
        parser.error(f"--mask-probability must be in (0, 1), got {args.mask_probability}")
    for name in ("batch_size", "max_length", "max_examples"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if not 0 <= args.seed < 2**64:  # what torch.Generator.manual_seed accepts
        parser.error(f"--seed must be an integer in [0, 2**64), got {args.seed}")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        parser.error(f"--output-dir {args.output_dir} is a file, not a directory")
    stems = {}
    for path in args.eval_file:
        if not path.is_file():
            parser.error(f"--eval-file {path}: no such file")
        if path.stem in stems:
            parser.error(f"--eval-file {path} and {stems[path.stem]} have the same name; results are kept by file name")
        stems[path.stem] = path
    args.masking = MASKINGS if args.masking == "both" else (args.masking,)
    return args


def token_kinds(tokenizer) -> torch.Tensor:
    """(vocabulary,) the index in WORD_KINDS of every token of a WordPiece vocabulary, whose "##" marks a piece that
    continues a word. A word's first piece counts as a content or function word by its own spelling."""
    kinds = torch.full((len(tokenizer),), WORD_KINDS.index("content"))
    for token, index in tokenizer.get_vocab().items():
        if token.startswith("##"):
            kinds[index] = WORD_KINDS.index("word_piece")
        elif all(unicodedata.category(char)[0] in "PS" for char in token):
            kinds[index] = WORD_KINDS.index("punctuation")
        elif token.lower() in FUNCTION_WORDS:
            kinds[index] = WORD_KINDS.index("function")
    return kinds


def whole_word_mask(real: torch.Tensor, continuation: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Extend each word's choice to the whole word: a token is masked when the first piece of its word is chosen.

    real, continuation, chosen: (batch, seq) bools; continuation marks "##" pieces."""
    return real & chosen.gather(1, word_start_positions(continuation))


class MaskedScores:
    """Sums over masked tokens, per kind of token: how many, top-1 hits, top-5 hits, negative log-likelihood."""

    def __init__(self):
        self.sums = torch.zeros(4, len(WORD_KINDS), dtype=torch.float64)  # (tokens / top-1 / top-5 / nll, kinds)

    @property
    def tokens(self) -> int:
        return int(self.sums[0].sum().item())

    def add(self, logits: torch.Tensor, targets: torch.Tensor, kinds: torch.Tensor) -> None:
        """logits: (masked tokens, vocab); targets, kinds: (masked tokens,)."""
        top5 = logits.topk(5, dim=-1).indices  # (masked tokens, 5)
        nll = F.cross_entropy(logits.float(), targets, reduction="none")  # float32: the softmax over 30k logits
        hits = [top5[:, 0] == targets, (top5 == targets.unsqueeze(-1)).any(-1)]
        values = torch.stack([torch.ones_like(nll), *(hit.float() for hit in hits), nll])  # (4, masked tokens)
        self.sums.index_add_(1, kinds, values.double())

    @staticmethod
    def _figures(tokens, top1, top5, nll, prefix=""):
        if not tokens:
            return {f"{prefix}top1_accuracy": None, f"{prefix}top5_accuracy": None, f"{prefix}perplexity": None}
        return {f"{prefix}top1_accuracy": top1 / tokens, f"{prefix}top5_accuracy": top5 / tokens,
                f"{prefix}perplexity": math.exp(nll / tokens)}

    def result(self) -> dict:
        by_kind = {kind: {"tokens": int(column[0]), **self._figures(*column.tolist())}
                   for kind, column in zip(WORD_KINDS, self.sums.T)}
        overall = self._figures(*self.sums.sum(1).tolist(), prefix="masked_")
        return {**overall, "masked_tokens": self.tokens, "masked_by_kind": by_kind}


@torch.no_grad()
def evaluate(model, tokenizer, examples, batch_size: int, mask_probability: float, seed: int,
             masking=MASKINGS, name: str = "the evaluation set") -> dict:
    generator = torch.Generator().manual_seed(seed)
    kinds = token_kinds(tokenizer)
    identity_correct = identity_tokens = 0
    scores = {mode: MaskedScores() for mode in masking}
    whole_words_masked = 0
    tokens_per_expert = dropped = None
    routed_batches = 0
    for start in tqdm(range(0, len(examples), batch_size), desc=f"evaluate {name}"):
        rows = [examples[i] for i in range(start, min(start + batch_size, len(examples)))]
        features = [{key: row[key] for key in ("input_ids", "token_type_ids", "attention_mask")} for row in rows]
        batch = tokenizer.pad(features, return_tensors="pt")
        special = torch.tensor(
            [tokenizer.get_special_tokens_mask(ids, already_has_special_tokens=True) for ids in batch["input_ids"].tolist()],
            dtype=torch.bool,
        )
        real = batch["attention_mask"].bool() & ~special
        batch_kinds = kinds[batch["input_ids"]]  # (batch, seq)
        continuation = real & (batch_kinds == WORD_KINDS.index("word_piece"))

        # The vocabulary head runs only where a token is scored: real tokens here, masked ones below.
        identity = model(**batch, labels=batch["input_ids"].masked_fill(~real, -100), only_labeled_logits=True)
        predicted = identity.logits.argmax(-1)  # (real tokens,)
        identity_correct += (predicted == batch["input_ids"][real]).sum().item()
        identity_tokens += real.sum().item()
        router_load = identity.tokens_per_expert  # (routers, experts)
        tokens_per_expert = router_load if tokens_per_expert is None else tokens_per_expert + router_load
        dropped = identity.dropped_fraction if dropped is None else dropped + identity.dropped_fraction
        routed_batches += 1

        # One draw per token serves both maskings: token masking uses every token's own, whole-word masking the draw
        # of each word's first piece, so the two hide the same words where words are single tokens.
        chosen = real & (torch.rand(real.shape, generator=generator) < mask_probability)
        for mode in masking:
            masked = chosen if mode == "token" else whole_word_mask(real, continuation, chosen)
            if not masked.any():
                continue
            corrupted = batch["input_ids"].masked_fill(masked, tokenizer.mask_token_id)
            labels = batch["input_ids"].masked_fill(~masked, -100)
            output = model(
                input_ids=corrupted,
                attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
                labels=labels,
                only_labeled_logits=True,
            )
            scores[mode].add(output.logits, labels[masked], batch_kinds[masked])
            if mode == "whole-word":
                whole_words_masked += (masked & ~continuation).sum().item()

    results = {"examples": len(examples), "identity_accuracy": identity_correct / identity_tokens,
               "identity_tokens": identity_tokens}
    for mode in masking:
        if not scores[mode].tokens:
            raise UsageError(
                f"{name}: --mask-probability {mask_probability} masked none of the {identity_tokens} tokens "
                f"evaluated: evaluate on more text, or raise --mask-probability"
            )
        if mode == "token":
            results.update(scores[mode].result())
        else:
            results["whole_word_masking"] = {**scores[mode].result(), "masked_words": whole_words_masked}
    load_fraction = tokens_per_expert / tokens_per_expert.sum(-1, keepdim=True)
    return {
        **results,
        "mask_probability": mask_probability,
        "expert_load": load_fraction.tolist(),
        "dropped_fraction": (dropped / routed_batches).tolist(),
    }


def load_eval_file(path: Path, tokenizer, max_length: int):
    """A plain-text evaluation file, one example per line, tokenized like the corpus."""
    check_text_file(path)
    lines = path.read_text(encoding="utf-8").splitlines()
    dataset = Dataset.from_dict({"text": lines}).map(
        lambda batch: tokenizer(batch["text"], truncation=True, max_length=max_length),
        batched=True, remove_columns=["text"], desc=f"tokenizing {path.name}",
    )
    return drop_examples_without_text(dataset, tokenizer, path)


def log_results(name: str, results: dict) -> None:
    logger.info("%s: %d examples | identity %.4f", name, results["examples"], results["identity_accuracy"])
    for label, figures in (("token masking", results), ("whole-word masking", results.get("whole_word_masking"))):
        if figures is None or "masked_top1_accuracy" not in figures:
            continue
        by_kind = ", ".join(
            f"{kind} {entry['top1_accuracy']:.3f}/{entry['top5_accuracy']:.3f}"
            for kind, entry in figures["masked_by_kind"].items() if entry["tokens"]
        )
        logger.info("%s, %s: top-1 %.4f | top-5 %.4f | perplexity %.1f | by kind (top-1/top-5) %s", name, label,
                    figures["masked_top1_accuracy"], figures["masked_top5_accuracy"], figures["masked_perplexity"],
                    by_kind)


def plot_expert_load(expert_load: list[list[float]], router_names: list[str], path: Path, title: str) -> None:
    """One bar chart per router (one per Switch layer, two in a layer that routes attention and feed-forward)."""
    routers, experts = len(expert_load), len(expert_load[0])
    figure, axes = plt.subplots(1, routers, figsize=(3.2 * routers, 3), sharey=True, squeeze=False)
    for router, axis in enumerate(axes[0]):
        axis.bar(range(experts), expert_load[router])
        axis.axhline(1 / experts, color="grey", linestyle="--", linewidth=1, label="uniform")
        axis.set_title(router_names[router])
        axis.set_xlabel("expert")
        axis.set_xticks(range(experts))
    axes[0][0].set_ylabel("fraction of tokens")
    axes[0][0].legend()
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_corpus(args.corpus_dir)
    config, tokenizer = load_config_and_tokenizer(args.model)
    if config.model_type != "switch":
        raise UsageError(f"--model {args.model} is a {config.model_type} model, not a Switch checkpoint")
    check_max_length(args.max_length, tokenizer, config.backbone_config.max_position_embeddings)
    model = load_model(args.model, config).float()
    validation_file = Path(args.corpus_dir) / "validation.txt"
    validation = load_tokenized_corpus(args.corpus_dir, tokenizer, args.max_length)["validation"]
    sets = {"validation": (validation_file, drop_examples_without_text(validation, tokenizer, validation_file))}
    for path in args.eval_file:
        sets[path.stem] = (path, load_eval_file(path, tokenizer, args.max_length))

    scored = {}
    for name, (path, examples) in sets.items():
        if args.max_examples is not None:
            examples = examples.select(range(min(args.max_examples, len(examples))))
        scored[name] = evaluate(model, tokenizer, examples, args.batch_size, args.mask_probability, args.seed,
                                masking=args.masking, name=str(path))
    results = {"model": args.model, "routers": model.config.router_names, **scored.pop("validation")}
    if scored:
        results["eval_files"] = scored
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "eval_results.json").write_text(json.dumps(results, indent=2))
    plot_expert_load(results["expert_load"], results["routers"], output_dir / "expert_load.png", f"Expert load: {Path(args.model).name}")
    log_results("validation", results)
    for name, figures in scored.items():
        log_results(name, figures)
    logger.info("dropped %s", [round(x, 4) for x in results["dropped_fraction"]])
    logger.info("wrote %s and %s", output_dir / "eval_results.json", output_dir / "expert_load.png")


if __name__ == "__main__":
    try:
        main()
    except UsageError as error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        sys.exit(2)
