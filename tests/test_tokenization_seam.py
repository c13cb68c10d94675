"""The tokenizer seam: outside `minilab.tokenization` no code opens a tokenizer file or spells a
special token, so training, evaluation, export and serving cannot drift onto different eos,
pad, stop or end-of-turn tokens. Read with ast, not by importing; docstrings and comments are
prose, not code, and may name tokens."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src" / "minilab"
SEAM = SRC / "tokenization.py"

# A special token as a whole string value (`</s>`, `<pad>`, `<end_of_turn>`, ...), or the
# unambiguous `<|...|>` form anywhere in a string (a ChatML template spells `<|im_start|>` inside).
_ANGLE = re.compile(r"^</?(s|pad|unk|bos|eos|mask|sep|cls|eot|eod|endoftext|(start|end)_of_(turn|text))>$")
_PIPE = re.compile(r"<\|[^<>|\s]+\|>")
_READERS = re.compile(r"open|read|load|from_file")  # calls that open a file by the name given


def _docstrings(tree: ast.AST) -> set[int]:
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    return {id(n.body[0].value) for n in ast.walk(tree) if isinstance(n, kinds) and n.body
            and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}


def _callee(node: ast.Call) -> str:
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else ""


def violations(path: Path, text: str | None = None) -> list[str]:
    """What `path` (or `text` as if it were that file) does that only the tokenizer module may."""
    tree = ast.parse(text if text is not None else path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                and (_ANGLE.match(node.value) or _PIPE.search(node.value)):
            found.append(f"{path.relative_to(SRC)}:{node.lineno}: special token spelled: {node.value[:40]!r}")
        elif isinstance(node, ast.Call):
            name = _callee(node)
            if name == "from_file":
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}() loads a tokenizer")
            elif _READERS.search(name) and any(isinstance(c, ast.Constant) and c.value == "tokenizer.json"
                                               for c in ast.walk(node)):
                found.append(f"{path.relative_to(SRC)}:{node.lineno}: {name}() opens tokenizer.json")
    return found


def test_only_the_tokenizer_module_opens_tokenizers_or_spells_special_tokens():
    found = [v for p in sorted(SRC.rglob("*.py")) if p != SEAM for v in violations(p)]
    assert not found, "outside minilab/tokenization.py:\n" + "\n".join(found)


@pytest.mark.parametrize("code", [
    'eos = "</s>"',
    'names = ("<pad>", "<unk>")',
    'end = "<end_of_turn>"',
    "t = \"{{ '<|im_start|>' + m['content'] }}\"",
    'x = tok.token_to_id("<|eot_id|>")',
    'tok = Tokenizer.from_file(str(d / "tokenizer.json"))',
    'data = json.loads((d / "tokenizer.json").read_text())',
    'with open(d / "tokenizer.json") as f: pass',
])
def test_the_scan_catches(code):
    assert violations(SRC / "finetune" / "sft.py", code)


@pytest.mark.parametrize("code", [
    'def f():\n    """Stops at `</s>` or `<|im_end|>`."""\n',  # prose
    'html = "<p>" + "</table>"',                           # markup is not a token
    'ok = (d / "tokenizer.json").is_file()',               # a check, not a read
    'shutil.copy2(d / "tokenizer.json", out)',
])
def test_the_scan_lets_pass(code):
    assert violations(SRC / "finetune" / "sft.py", code) == []


def test_the_tokenizer_module_itself_is_where_they_live():
    assert violations(SEAM)  # the scan sees the tokens it holds: the test above is not vacuous


# ---- drifts fixed by the one renderer ---------------------------------------------------------------
def test_a_template_that_does_not_compile_is_a_one_line_error_for_inference_too():
    """`Engine`'s chat format used to build its own sandbox and let Jinja's syntax error escape
    (a traceback at load); fine-tuning's said what was wrong. Both now use the one renderer."""
    from minilab.errors import MinilabError
    from minilab.inference import ChatFormat

    with pytest.raises(MinilabError, match="chat template does not compile"):
        ChatFormat("{% for m in messages %}", {"bos_token": "", "eos_token": ""})


def test_named_templates_without_a_default_body_are_no_template(tmp_path):
    """Of several named templates, the default one; a "default" entry without a body used to be
    a KeyError in fine-tuning (inference already read it as no template)."""
    import json

    from minilab.errors import ConfigError
    from minilab.finetune.templates import resolve_template

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [{"name": "default"}]}))
    with pytest.raises(ConfigError, match="no chat_template"):
        resolve_template("model", str(tmp_path))
