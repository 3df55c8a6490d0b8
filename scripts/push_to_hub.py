"""Publish a trained Switch checkpoint to a Hugging Face Hub, with its code, pipeline and model card, in one commit.

    python scripts/push_to_hub.py switch_hf/checkpoints/switch-minilm-l6-e8 org/switch-bert
    python scripts/push_to_hub.py runs/minilm-e8/final org/switch-bert --revision experiment --private
    python scripts/push_to_hub.py runs/minilm-e8/final org/switch-bert --save-to /tmp/preview   # stage only

The Hub is the one `HF_ENDPOINT` names (https://huggingface.co when unset); the token is `HF_TOKEN` or the one
`hf auth login` stored. For a server without Xet storage set `HF_HUB_DISABLE_XET=1`.

The checkpoint directory is only read. Its `eval_results.json` (from scripts/evaluate.py) and `training_data.json`
(e.g. a copy of data/corpus/sources.json) fill the model card when present; see switch_hf/hub.py for what is read.
Exit status: 0 pushed, 1 the Hub refused or could not be reached (its message is printed), 2 the checkpoint or the
arguments are unusable, 130 interrupted (nothing is committed then).
"""

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path


logger = logging.getLogger("push_to_hub")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint_dir", help="directory of a checkpoint saved by scripts/train.py (OUTPUT_DIR/final)")
    parser.add_argument("repo_id", help='the repo to push to, "namespace/name"; created when missing')
    parser.add_argument("--revision", default=None, help="branch to commit to (default: main); created when missing")
    parser.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its setting)"
    )
    parser.add_argument("--commit-message", default=None)
    parser.add_argument(
        "--save-to", default=None, metavar="DIR", help="write what would be pushed to DIR and push nothing"
    )
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f'repo_id must be "namespace/name", got {args.repo_id!r}')
    return args


def describe_hub_error(error) -> str:
    """The server's own words for a refused request, with its HTTP status."""
    response = getattr(error, "response", None)
    status = f"HTTP {response.status_code}" if response is not None else "no response"
    message = getattr(error, "server_message", None) or str(error)
    return f"the Hub refused the push ({status}): {message.strip()}"


def connection_errors() -> tuple[type[BaseException], ...]:
    """Errors meaning the Hub could not be reached: those of the HTTP client huggingface_hub uses (httpx2 in its
    2.x releases, httpx in 1.x), and the OS's own."""
    errors = [ConnectionError]
    for client in ("httpx2", "httpx"):
        try:
            errors.append(importlib.import_module(client).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Imported after parsing, so that --help answers without loading torch.
    from huggingface_hub import constants
    from huggingface_hub.errors import HfHubHTTPError

    from switch_hf import hub

    checkpoint_dir = Path(args.checkpoint_dir)
    try:
        model, tokenizer = hub.load_checkpoint(checkpoint_dir)
        eval_results, training_data = hub.read_checkpoint_metadata(checkpoint_dir)
        if args.save_to is not None:
            hub.save_for_hub(
                model, tokenizer, args.save_to, args.repo_id, eval_results=eval_results, training_data=training_data
            )
            logger.info("staged the repo contents in %s; nothing was pushed", args.save_to)
            return 0
    except (OSError, ValueError) as error:
        print(f"push_to_hub: error: cannot use the checkpoint {checkpoint_dir}: {error}", file=sys.stderr)
        return 2

    try:
        commit = hub.push_to_hub(
            model,
            tokenizer,
            args.repo_id,
            revision=args.revision,
            private=args.private or None,
            commit_message=args.commit_message,
            eval_results=eval_results,
            training_data=training_data,
        )
    except HfHubHTTPError as error:
        print(f"push_to_hub: error: {describe_hub_error(error)}", file=sys.stderr)
        return 1
    except connection_errors() as error:
        print(f"push_to_hub: error: cannot reach the Hub at {constants.ENDPOINT}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        # The commit is the last request and the Hub applies it whole or not at all: nothing partial is left.
        print("push_to_hub: interrupted; no partial commit was made", file=sys.stderr)
        return 130
    logger.info("pushed %s to %s (commit %s)", checkpoint_dir, commit.commit_url, commit.oid)
    print(commit.commit_url)
    return 0


if __name__ == "__main__":
    exit_code = main()
    if exit_code == 130:
        # Interrupted: upload threads may still be blocked on the network, and a normal exit would wait for their
        # requests to end. Nothing is left to clean up, since the commit was never sent: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
