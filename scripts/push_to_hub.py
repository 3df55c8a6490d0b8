"""Publish a trained Switch checkpoint to a Hugging Face Hub, with its code, pipeline and model card, in one commit.

    python scripts/push_to_hub.py switch_hf/checkpoints/switch-minilm-l6-e8 org/switch-bert
    python scripts/push_to_hub.py runs/minilm-e8/final org/switch-bert --revision experiment --private
    python scripts/push_to_hub.py runs/minilm-e8/final org/switch-bert --save-to /tmp/preview   # stage only

The Hub is the one `HF_ENDPOINT` names (https://huggingface.co when unset); the token is `HF_TOKEN` or the one
`hf auth login` stored. For a server without Xet storage set `HF_HUB_DISABLE_XET=1`. Credentials (the token, a
user:password@ in `HF_ENDPOINT`) are never printed: every message and log line shows *** in their place.

The checkpoint directory is only read, and its weights are published in the dtypes it stores them in. Its
`eval_results.json` (from scripts/evaluate.py) and `training_data.json` (e.g. a copy of data/corpus/sources.json) fill
the model card when present; see switch_hf/hub.py for what is read. A repo the push created is deleted again when the
push then fails or is interrupted.
Exit status: 0 pushed, 1 the Hub refused or could not be reached (its message is printed), 2 the checkpoint or the
arguments are unusable, 130 interrupted by Ctrl-C or SIGTERM (nothing is committed then).
"""

import argparse
import contextlib
import importlib
import logging
import os
import signal
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
        "--save-to",
        default=None,
        metavar="DIR",
        help="write what would be pushed to DIR (new or empty, not the checkpoint) and push nothing",
    )
    args = parser.parse_args(argv)
    if args.repo_id.count("/") != 1 or not all(args.repo_id.split("/")):
        parser.error(f'repo_id must be "namespace/name", got {args.repo_id!r}')
    if args.save_to is not None:
        checkpoint_dir, save_to = Path(args.checkpoint_dir).resolve(), Path(args.save_to).resolve()
        if save_to == checkpoint_dir or checkpoint_dir in save_to.parents:
            parser.error(
                f"--save-to {args.save_to} is in the checkpoint directory {args.checkpoint_dir}, which a push only "
                "reads: stage into a new or empty directory elsewhere"
            )
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


def describe_push_failure(error: BaseException, endpoint: str) -> str | None:
    """What went wrong between us and the Hub, from `error` or the error that caused it (huggingface_hub reports a
    failed upload as a RuntimeError raised from the HTTP error); None for anything else."""
    from huggingface_hub.errors import HfHubHTTPError

    cause = error
    while cause is not None:
        if isinstance(cause, HfHubHTTPError):
            reason = describe_hub_error(cause)
        elif isinstance(cause, connection_errors()):
            reason = f"cannot reach the Hub at {endpoint}: {cause}"
        else:
            cause = cause.__cause__
            continue
        return reason if cause is error else f"{str(error).rstrip('.')}: {reason}"
    return None


@contextlib.contextmanager
def redacted_logging(secrets: list[str]):
    """While the push runs, every log record of every library (huggingface_hub logs request URLs, httpx every
    request) and every warning goes out with credentials replaced by ***."""
    from switch_hf.hub import redact_credentials

    make_record = logging.getLogRecordFactory()

    def make_redacted_record(*args, **kwargs):
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except (TypeError, ValueError):  # a library's malformed logging call: show its parts rather than fail it
            message = f"{record.msg} {record.args}"
        record.msg, record.args = redact_credentials(message, secrets), None
        if record.exc_info:
            record.exc_text = redact_credentials(logging.Formatter().formatException(record.exc_info), secrets)
        return record

    logging.setLogRecordFactory(make_redacted_record)
    logging.captureWarnings(True)
    try:
        yield
    finally:
        logging.captureWarnings(False)
        logging.setLogRecordFactory(make_record)


@contextlib.contextmanager
def sigterm_interrupts():
    """SIGTERM (`kill`, a job scheduler stopping the job) unwinds the push as Ctrl-C does, so that the staging
    directory is removed and a repo the push created is deleted, instead of the process dying on the spot."""
    previous_handler = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous_handler)


def fail(message: str, exit_code: int, secrets: list[str]) -> int:
    """Print `message` as the error, credentials redacted, and return `exit_code`."""
    from switch_hf.hub import redact_credentials

    print(f"push_to_hub: error: {redact_credentials(message, secrets)}", file=sys.stderr)
    return exit_code


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    # Imported after parsing, so that --help answers without loading torch.
    from switch_hf import hub

    secrets = hub.known_credentials()
    with redacted_logging(secrets), sigterm_interrupts():
        try:
            return push(args, secrets)
        except KeyboardInterrupt:
            # The commit is the last request and the Hub applies it whole or not at all: nothing partial is left.
            return fail("interrupted; no partial commit was made", 130, secrets)


def push(args, secrets: list[str]) -> int:
    """Stage or push as `args` ask; the exit status."""
    from huggingface_hub import constants

    from switch_hf import hub

    checkpoint_dir = Path(args.checkpoint_dir)
    if args.save_to is not None:
        try:
            hub.check_save_directory(args.save_to)
        except OSError as error:
            return fail(f"--save-to: {error}", 2, secrets)
    try:
        model, tokenizer = hub.load_checkpoint(checkpoint_dir)
        eval_results, training_data = hub.read_checkpoint_metadata(checkpoint_dir)
        # The compute dtype the checkpoint's config.json declares (`load_checkpoint` leaves it there), which may
        # differ from the dtype its weights are stored in: the release stores float16 and declares float32.
        contents = dict(eval_results=eval_results, training_data=training_data, config_dtype=model.config.dtype)
        if args.save_to is not None:
            hub.save_for_hub(model, tokenizer, args.save_to, args.repo_id, **contents)
            logger.info("staged the repo contents in %s; nothing was pushed", args.save_to)
            return 0
    except (OSError, ValueError) as error:
        return fail(f"cannot use the checkpoint {checkpoint_dir}: {error}", 2, secrets)

    try:
        commit = hub.push_to_hub(
            model,
            tokenizer,
            args.repo_id,
            revision=args.revision,
            private=args.private or None,
            commit_message=args.commit_message,
            **contents,
        )
    except Exception as error:
        reason = describe_push_failure(error, constants.ENDPOINT)
        if reason is None:
            raise
        return fail(reason, 1, secrets)
    logger.info("pushed %s to %s (commit %s)", checkpoint_dir, commit.commit_url, commit.oid)
    print(hub.redact_credentials(commit.commit_url, secrets))
    return 0


if __name__ == "__main__":
    exit_code = main()
    if exit_code == 130:
        # Interrupted: upload threads may still be blocked on the network, and a normal exit would wait for their
        # requests to end. The staging directory is already removed and the commit was never sent: leave at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
    sys.exit(exit_code)
