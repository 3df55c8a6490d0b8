"""transformers' own model test mixins, `ModelTesterMixin` and `ConfigTester`, for the transformers version installed.

transformers tests every model it ships with `tests/test_modeling_common.py` and `tests/test_configuration_common.py`.
Neither file is in the installed package (the wheel has no `tests/`), and a copy in this repository would pin the
checks to one release. `load()` takes them from that version's source distribution on PyPI instead, downloaded once
into `~/.cache/switch_hf/transformers-tests/<version>/` (`SWITCH_HF_CACHE` moves `~/.cache/switch_hf`).

The sdist carries only the top-level `tests/test*.py` files, which setuptools adds to every sdist by default, and
none of `tests/`'s subpackages. Three of those are imported by the two files and ship in no PyPI artefact of
transformers (the wheel has no `tests/` at all): `tests/generation/test_utils.py`, `tests/exporters/test_export.py`
and `tests/utils/test_configuration_utils.py`. `load()` writes the stand-ins below in their place; each says what it
leaves out.
"""

import importlib
import importlib.util
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import transformers

# The files taken from the sdist; everything they import from the tests tree is a stand-in below.
FILES_FROM_SDIST = ("test_modeling_common.py", "test_configuration_common.py")
# Imported under its own name, so that it can never be mistaken for a `tests` package on `sys.path`.
PACKAGE = "transformers_sdist_tests"

_GENERATION_TEST_UTILS = '''\
"""Stand-in for transformers' tests/generation/test_utils.py, which is on no PyPI artefact."""


class GenerationTesterMixin:
    """The real mixin adds the `generate()` tests. test_modeling_common only checks that a test class inherits it
    exactly when its models can generate; the Switch models cannot, so no test class inherits it."""
'''

_EXPORTERS_TEST_EXPORT = '''\
"""Stand-in for transformers' tests/exporters/test_export.py, which is on no PyPI artefact."""


class ExportTesterMixin:
    """`ModelTesterMixin`'s base class. The real one adds the export tests (torch.export, ONNX, ExecuTorch and other
    backends); without its source those tests do not run here."""
'''

_UTILS_TEST_CONFIGURATION_UTILS = '''\
"""Stand-in for transformers' tests/utils/test_configuration_utils.py, which is on no PyPI artefact."""


class _NotShipped(dict):
    """Read only by `ConfigTester.check_config_arguments_init`, which returns before reading it for a config with
    sub-configs (`SwitchConfig` has `backbone_config`). Any other read fails instead of checking nothing."""

    def _fail(self, *args, **kwargs):
        raise RuntimeError(
            "config_common_kwargs lives in transformers' tests/utils/test_configuration_utils.py, which is on no "
            "PyPI artefact; a config without sub-configs needs its real values"
        )

    __deepcopy__ = __iter__ = items = keys = values = _fail


config_common_kwargs = _NotShipped()
'''

STAND_INS = {
    "__init__.py": '"""transformers\' tests/ tree, as far as its sdist carries it."""\n',
    "generation/__init__.py": "",
    "generation/test_utils.py": _GENERATION_TEST_UTILS,
    "exporters/__init__.py": "",
    "exporters/test_export.py": _EXPORTERS_TEST_EXPORT,
    "utils/__init__.py": "",
    "utils/test_configuration_utils.py": _UTILS_TEST_CONFIGURATION_UTILS,
}


class CommonTestsUnavailable(RuntimeError):
    """The common test files could not be obtained from PyPI."""


def cache_dir(version: str = transformers.__version__) -> Path:
    root = Path(os.environ.get("SWITCH_HF_CACHE", Path.home() / ".cache" / "switch_hf"))
    return root / "transformers-tests" / version


def load(version: str = transformers.__version__) -> ModuleType:
    """The package holding `test_modeling_common` and `test_configuration_common` of transformers `version`,
    imported (as `transformers_sdist_tests`) with both modules loaded.

    Raises:
        CommonTestsUnavailable: the sdist could not be downloaded or lacks the files (with pip's own message), or a
            package the files import is not installed.
    """
    directory = cache_dir(version)
    if not _complete(directory):
        _download(version, directory)
    # Rewritten on every load, so that a change to a stand-in never needs the cache cleared.
    for relative, text in STAND_INS.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)

    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PACKAGE, directory / "__init__.py", submodule_search_locations=[str(directory)]
        )
        package = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = package
        spec.loader.exec_module(package)
    for name in FILES_FROM_SDIST:
        try:
            importlib.import_module(f"{PACKAGE}.{Path(name).stem}")
        except ModuleNotFoundError as error:
            raise CommonTestsUnavailable(
                f"transformers' {name} imports {error.name!r}, which is not installed; the project's dev extras "
                f"install it (pip install -e '.[dev]')"
            ) from error
    return sys.modules[PACKAGE]


def _download(version: str, directory: Path):
    """`pip download` the sdist of transformers `version` (with pip's own index settings) and extract the files."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Beside the cache, so that the finished directory moves into place in one rename: an interrupted download never
    # leaves a partial cache, and of two processes downloading at once, the second finds the first's files.
    with tempfile.TemporaryDirectory(dir=directory.parent) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", f"transformers=={version}",
            "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check", "--dest", scratch,
        ]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        sdists = list(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or len(sdists) != 1:
            raise CommonTestsUnavailable(
                f"could not download the source distribution of transformers {version} from PyPI, which holds "
                f"transformers' common model tests.\n$ {' '.join(command)}\nexit status {result.returncode}\n"
                f"{result.stderr[-3000:]}"
            )
        staging = Path(scratch) / "tests"
        staging.mkdir()
        with tarfile.open(sdists[0]) as archive:
            for name in FILES_FROM_SDIST:
                member = f"{sdists[0].name.removesuffix('.tar.gz')}/tests/{name}"
                try:
                    source = archive.extractfile(member)
                except KeyError:
                    source = None
                if source is None:
                    raise CommonTestsUnavailable(f"{sdists[0].name} from PyPI has no {member}")
                (staging / name).write_bytes(source.read())
        if directory.exists() and not _complete(directory):
            shutil.rmtree(directory)  # a cache that lost a file
        try:
            staging.rename(directory)
        except OSError:
            if not _complete(directory):
                raise


def _complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in FILES_FROM_SDIST)
