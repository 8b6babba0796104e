"""The README's commands and Python examples, run as written, so the documentation cannot rot (as
onnx-graphsurgeon's tests/test_examples.py runs each example's README commands).

What is run comes from the files themselves, so editing them changes what is tested:

- README.md: every line of a ```bash block and every ```python block, in document order, in one
  temporary folder holding a copy of models/ (the README's commands run from the repository's
  root; nothing is written into the repository). Each must exit with 0, or with the code its
  trailing comment names (`# exit code 3`). ```text blocks (synopses with placeholders) and other
  languages are not run. Of the two first-screen commands only the part after the last `&&` runs
  (the virtual environment and the install are the test's own), and the test command is skipped.
- `python tools/...` commands (README and docs/): benchmarks of minutes to hours on data outside
  the repository, so they are not run; their arguments are parsed by the tool's own parser and the
  names they select (methods, models, fuzz kinds) checked against the tool's lists.
- `onnx-bitsplit` commands in docs/*.md: their models and data are outside the repository, so
  only their options' names are checked, by the command's own parser.
- Every option that `onnx-bitsplit --help`, `quantize --help` and `check --help` list appears in
  README.md, the JSON that the README's `--report` and `check --json` commands write has the
  fields of docs/json.md's examples, and every file the pages name (`tests/...`, `layout.py`) exists.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
JSON_DOC = REPO / "docs" / "json.md"
RUNNABLE = ("bash", "python")
EXPECTED_EXIT = re.compile(r"#.*\bexit code (\d+)")
PROVIDER_MODULES = {"qnn": "onnxruntime_qnn", "openvino": "openvino"}
TIMEOUT = 900  # seconds a command may take: a conversion of the embedded model takes 10-30


@dataclass(frozen=True)
class Example:
    """One command line of a ```bash block, or a whole ```python block."""

    file: str
    line: int
    language: str
    text: str

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def code_blocks(path: Path) -> list[tuple[int, str, list[str]]]:
    """(line of the opening fence, language, lines) of every fenced block."""
    blocks, language, start, lines = [], None, 0, []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if language is None and line.startswith("```"):
            language, start, lines = line[3:].strip().split(" ")[0], number, []
        elif language is not None and line.startswith("```"):
            blocks.append((start, language, lines))
            language = None
        elif language is not None:
            lines.append(line)
    assert language is None, f"{path.name}: the block opened at line {start} is not closed"
    return blocks


def examples(path: Path) -> list[Example]:
    """The runnable examples of a Markdown file, in document order: each command of a ```bash block
    (lines ending in a backslash joined), each ```python block whole."""
    found = []
    for start, language, lines in code_blocks(path):
        if language == "python":
            found.append(Example(path.name, start, language, "\n".join(lines) + "\n"))
        elif language == "bash":
            command, first = "", None
            for number, line in enumerate(lines, start + 1):
                first = first or number
                command += line.rstrip()
                if command.endswith("\\"):
                    command = command[:-1] + " "
                    continue
                if command.strip() and not command.lstrip().startswith("#"):
                    found.append(Example(path.name, first, language, command.strip()))
                command, first = "", None
    return found


def words(command: str) -> list[str]:
    """The command's words after the last `&&` (the first-screen commands create and activate a
    virtual environment and install the project first: that is this test's environment)."""
    tokens = shlex.split(command, comments=True)
    while "&&" in tokens:
        tokens = tokens[tokens.index("&&") + 1:]
    return tokens


def expected_exit(command: str) -> int:
    match = EXPECTED_EXIT.search(command)
    return int(match.group(1)) if match else 0


def is_test_command(tokens: list[str]) -> bool:
    return tokens[:3] == ["python", "-m", "pytest"]


def is_tool_command(tokens: list[str]) -> bool:
    return len(tokens) > 1 and tokens[0] == "python" and tokens[1].startswith("tools/")


def environment() -> dict[str, str]:
    """The repository's code first on the path, whatever the installation (stderr is captured, so
    the command prints no progress bars)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=environment(), stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=TIMEOUT)


def outcome(result: subprocess.CompletedProcess) -> str:
    return f"exit code {result.returncode}\nstdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A folder standing for the repository's root: models/ copied, everything else written here."""
    folder = tmp_path_factory.mktemp("readme")
    shutil.copytree(REPO / "models", folder / "models")
    return folder


README_EXAMPLES = examples(README)


def test_readme_has_examples():
    languages = {example.language for example in README_EXAMPLES}
    assert languages == set(RUNNABLE), languages
    commands = [words(example.text) for example in README_EXAMPLES if example.language == "bash"]
    assert commands[0][:2] == ["onnx-bitsplit", "models/efficientnet-lite0.onnx"], "the quick start comes first"


@pytest.mark.slow
@pytest.mark.parametrize("example", README_EXAMPLES, ids=[example.id for example in README_EXAMPLES])
def test_readme_example(example: Example, workdir: Path):
    """Each example in document order, in the same folder: later ones use what earlier ones wrote
    (the check commands read the quick start's q4.onnx)."""
    if example.language == "python":
        script = workdir / f"readme_{example.line}.py"
        script.write_text(example.text, encoding="utf-8")
        result = run([sys.executable, script.name], workdir)
        assert result.returncode == 0, outcome(result)
        return
    tokens = words(example.text)
    if is_test_command(tokens):
        pytest.skip("the test suite itself: running it from one of its tests would recurse")
    if is_tool_command(tokens):
        check_tool_arguments(tokens[1], tokens[2:])
        return
    assert tokens[0] == "onnx-bitsplit", f"{example.id}: a command this test cannot run: {example.text}"
    provider = tokens[tokens.index("--provider") + 1] if "--provider" in tokens else "cpu"
    if provider in PROVIDER_MODULES and importlib.util.find_spec(PROVIDER_MODULES[provider]) is None:
        pytest.skip(f"--provider {provider} needs {PROVIDER_MODULES[provider]} (pip install -e '.[test]')")
    result = run([sys.executable, "-m", "onnx_bitsplit", *tokens[1:]], workdir)
    assert result.returncode == expected_exit(example.text), outcome(result)
    check_json_fields(tokens, result.stdout, workdir)


def check_json_fields(tokens: list[str], stdout: str, workdir: Path) -> None:
    """The fields of what the command wrote as JSON are those of docs/json.md's example."""
    if "--report" in tokens:
        target = tokens[tokens.index("--report") + 1]
        written = json.loads(stdout if target == "-" else (workdir / target).read_text())
        assert_same_fields(written, json_example("calibration_samples"))
    if tokens[1] == "check" and "--json" in tokens:
        assert_same_fields(json.loads(stdout), json_example("thresholds"))


def json_example(key: str) -> dict:
    """The ```json example of docs/json.md that has this top-level key."""
    for _, language, lines in code_blocks(JSON_DOC):
        if language == "json" and key in (document := json.loads("\n".join(lines))):
            return document
    raise AssertionError(f"docs/json.md has no JSON example with '{key}'")


def assert_same_fields(written: dict, example: dict) -> None:
    assert_fields("", written, example)
    for key in ("tool", "files", "sizes", "memory", "thresholds", "placement"):
        if isinstance(example.get(key), dict):
            assert_fields(key, written[key], example[key])
    for key in ("layers", "outputs", "activations"):
        if example.get(key):
            assert_fields(f"{key}[0]", written[key][0], example[key][0])


def assert_fields(where: str, written: dict, example: dict) -> None:
    documented = set(example) - {"..."}
    assert set(written) == documented, (
        f"fields of {where or 'the document'}: written but not in docs/json.md {sorted(set(written) - documented)}, "
        f"in docs/json.md but not written {sorted(documented - set(written))}")


class _Parsed(Exception):
    def __init__(self, namespace: argparse.Namespace):
        super().__init__()
        self.namespace = namespace


def check_tool_arguments(script: str, args: list[str]) -> None:
    """Parse a tool's command line with the tool's own parser, without running it, and check the
    names it selects against the tool's lists."""
    path = REPO / script
    assert path.is_file(), f"{script} does not exist"
    name = f"readme_{path.stem}"  # not the tool's own name: tests import some tools under theirs
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(path.parent))
    original = argparse.ArgumentParser.parse_args

    def parse_only(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argv, argparse.ArgumentParser.parse_args = sys.argv, parse_only
    sys.argv = [script, *args]
    try:
        module.main()
    except _Parsed as parsed:
        namespace = vars(parsed.namespace)
    except SystemExit as exc:  # argparse's error: an unknown option or a bad value (printed on stderr)
        raise AssertionError(f"{script} refuses {shlex.join(args)} (exit code {exc.code})") from None
    else:
        raise AssertionError(f"{script} ran without parsing its arguments with argparse")
    finally:
        sys.argv, argparse.ArgumentParser.parse_args = argv, original
    for option, names in (("methods", {**getattr(module, "METHODS", {}), **getattr(module, "ABLATIONS", {})}),
                          ("models", getattr(module, "MODELS", {})), ("kinds", getattr(module, "KINDS", ()))):
        if names and isinstance(namespace.get(option), str):
            unknown = set(namespace[option].split(",")) - set(names)
            assert not unknown, f"{script}: unknown --{option} {sorted(unknown)}"


DOC_EXAMPLES = [example for path in DOCS for example in examples(path)]


@pytest.mark.parametrize("example", DOC_EXAMPLES, ids=[f"docs/{example.id}" for example in DOC_EXAMPLES])
def test_docs_command_parses(example: Example):
    """The docs' commands take minutes to hours on data outside the repository: their options are
    checked, not run."""
    assert example.language == "bash", f"docs/{example.id}: only README.md's Python examples are run"
    tokens = words(example.text)
    if tokens[:2] == ["pip", "install"]:
        pytest.skip("an installation from the package index")
    if is_tool_command(tokens):
        check_tool_arguments(tokens[1], tokens[2:])
        return
    assert tokens[0] == "onnx-bitsplit", f"docs/{example.id}: a command this test cannot check: {example.text}"
    # --help after the arguments: click parses every option (an unknown one is a usage error,
    # exit code 2) and then prints the help instead of running
    result = run([sys.executable, "-m", "onnx_bitsplit", *tokens[1:], "--help"], REPO)
    assert result.returncode == 0, outcome(result)


def help_options(*command: str) -> set[str]:
    """The options an `onnx-bitsplit ... --help` lists."""
    result = run([sys.executable, "-m", "onnx_bitsplit", *command, "--help"], REPO)
    assert result.returncode == 0, outcome(result)
    names = re.findall(r"^  (-\S.*?)(?:\s{2,}|$)", result.stdout.split("Options:", 1)[1], re.MULTILINE)
    return {option for name in names for option in re.findall(r"(?<![\w-])--?[a-z][a-z0-9-]*", name)}


@pytest.mark.parametrize("command", [(), ("quantize",), ("check",)], ids=["group", "quantize", "check"])
def test_readme_documents_every_option(command: tuple[str, ...]):
    """Each option the command's --help lists appears in a code span of README.md."""
    text = README.read_text(encoding="utf-8")
    undocumented = {option for option in help_options(*command)
                    if not re.search(rf"`[^`]*(?<![\w-]){option}(?![\w-])", text)}
    assert not undocumented, f"README.md does not document {sorted(undocumented)} of onnx-bitsplit {' '.join(command)}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda path: path.name)
def test_named_files_exist(path: Path):
    """Every file a page names in a code span exists: `tests/...`, `tools/...` from the repository's
    root, a bare module name such as `layout.py` in onnx_bitsplit/."""
    named = set(re.findall(r"`([\w./-]+\.py)`", path.read_text(encoding="utf-8")))
    missing = sorted(name for name in named
                     if not (REPO / name if "/" in name else REPO / "onnx_bitsplit" / name).is_file())
    assert not missing, f"{path.name} names files that do not exist: {missing}"
