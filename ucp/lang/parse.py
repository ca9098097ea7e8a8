"""Parsing UCL text into its AST (:mod:`ucp.lang.ast`); syntax errors name file, line and column.

The Lark transformer here only builds nodes: every meaning check is a validation pass
(:mod:`ucp.lang.validate`).
"""

from __future__ import annotations

from lark import Token, Transformer, v_args
from lark.exceptions import LarkError, UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from ucp.errors import UclError
from ucp.lang import ast
from ucp.lang.grammar import parser


def _pos(meta_or_token) -> ast.Pos:
    return ast.Pos(getattr(meta_or_token, "line", 0) or 0, getattr(meta_or_token, "column", 0) or 0)


_EXPECTED = {
    "STRING": 'a quoted string', "NAME": "a name", "INT": "an integer", "_NL": "end of line", "COLON": "':'",
    "LPAR": "'('", "RPAR": "')'", "COMMA": "','", "EQUAL": "'='", "$END": "end of file", "UCL": "'ucl'",
}


def _expected(names) -> str:
    words = sorted({_EXPECTED.get(n, repr(n.lower()) if n.isupper() else n) for n in names})
    return ", ".join(words[:8]) + (" ..." if len(words) > 8 else "")


#: UCL's integers are sizes, dimensions and versions: below 2^63, as every integer of the formats
MAX_INT = (1 << 63) - 1


def _integer(token: Token, file: str) -> int:
    """A bounded integer: a token of 4,300+ digits would otherwise hit Python's int-string conversion
    limit (a multi-line ValueError) and any long one ends as an overflow further on."""
    text = str(token)
    if len(text.lstrip("+-0")) > len(str(MAX_INT)) or int(text) > MAX_INT:
        shown = text if len(text) <= 24 else f"{text[:20]}... ({len(text)} digits)"
        raise UclError(f"integer {shown} is too large; UCL integers are at most {MAX_INT}", file,
                       token.line or 0, token.column or 0)
    return int(text)


@v_args(meta=True)
class _Build(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def start(self, meta, children):
        version, *statements = children
        return ast.Program(version, tuple(statements), _pos(meta))

    def version(self, meta, children):
        return _integer(children[0], self.file)

    def setting(self, meta, children):
        return ast.Setting(str(children[0]), children[1], _pos(meta))

    def source_layout(self, meta, children):
        return ast.SourceLayout(tuple(children), _pos(meta))

    def model(self, meta, children):
        return ast.Model(tuple(children), _pos(meta))

    def rule(self, meta, children):
        globs = tuple(c.text for c in children if isinstance(c, ast.Quoted))
        transforms = tuple(c for c in children if isinstance(c, ast.Transform))
        return ast.Rule(globs, transforms, _pos(meta))

    def call(self, meta, children):
        name, *args = children
        positional = tuple(a[1] for a in args if a is not None and a[0] is None)
        keywords = tuple((a[0], a[1]) for a in args if a is not None and a[0] is not None)
        return ast.Transform(str(name), positional, keywords, _pos(meta))

    def keyword(self, meta, children):
        return (str(children[0]), children[1])

    def positional(self, meta, children):
        return (None, children[0])

    def optimizer(self, meta, children):
        name, *rest = children
        states = tuple(str(c) for c in rest if isinstance(c, Token))
        settings = tuple(c for c in rest if isinstance(c, ast.Setting))
        return ast.Optimizer(str(name), states, settings, _pos(meta))

    def export_rename(self, meta, children):
        return ast.ExportRename(children[0].text, children[1].text, _pos(meta))

    def export_split(self, meta, children):
        return ast.ExportSplit(tuple(c.text for c in children), _pos(meta))

    def int(self, meta, children):
        return _integer(children[0], self.file)

    def name(self, meta, children):
        return str(children[0])

    def string(self, meta, children):
        return children[0]  # already a Quoted (see STRING)

    def STRING(self, token):
        return ast.Quoted(str(token)[1:-1])


def parse(text: str, file: str = "<ucl>") -> ast.Program:
    """Parse UCL ``text``; ``file`` names it in errors.

    Raises:
        UclError: the text is not UCL; the message says where and what was expected.
    """
    if not isinstance(text, str):
        raise UclError(f"UCL text must be a string, got {type(text).__name__}", file)
    try:
        tree = parser().parse(text if text.endswith("\n") else text + "\n")
        return _Build(file).transform(tree)
    except UnexpectedEOF as e:
        raise UclError(f"unexpected end of file; expected {_expected(e.expected)}", file, e.line, e.column) from None
    except UnexpectedToken as e:
        got = "end of line" if e.token.type == "_NL" else "end of file" if e.token.type == "$END" else repr(str(e.token))
        raise UclError(f"unexpected {got}; expected {_expected(e.expected)}", file, e.line, e.column) from None
    except UnexpectedCharacters as e:
        allowed = _expected(e.allowed) if e.allowed else "something else"
        raise UclError(f"unexpected character {e.char!r}; expected {allowed}", file, e.line, e.column) from None
    except UnexpectedInput as e:
        raise UclError("cannot parse here", file, getattr(e, "line", 0), getattr(e, "column", 0)) from None
    except VisitError as e:
        if isinstance(e.orig_exc, UclError):
            raise e.orig_exc from None
        raise UclError(f"cannot parse: {' '.join(str(e.orig_exc).split())}", file) from None
    except (LarkError, ValueError) as e:
        raise UclError(f"cannot parse: {' '.join(str(e).split())}", file) from None
