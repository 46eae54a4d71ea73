"""The Megatron-LM command line a bash training script runs, read without running anything.

Megatron-LM runs are launched from bash scripts: variables (`TP=2`, `CKPT=${1:-ckpt}`), arrays of flags
(`GPT_ARGS=(--num-layers 32 ...)`, `ARGS+=(...)`), their expansions (`"${GPT_ARGS[@]}"`, `$((A*B))`),
comments, line continuations and a few `if [[ "$X" == y ]]` branches around one
`torchrun ... pretrain_gpt.py ...` line. This module interprets exactly that much bash and nothing more:
no command runs and the environment is never read, so the result depends on the script alone. What it
cannot evaluate (an unset variable, `$(command)`, a file test, a loop) is never guessed: the text stays
in the value as written (`$1`, `$(date)`) and a note says so.

Words are unquoted and split by `shlex`, after expansion: an expansion in double quotes is one word (or,
for `"${A[@]}"`, one word per element), an unquoted one is split again by `shlex`, so a flag written as
one array element (`"--split '99,1,0'"`) gives the words a user means.
"""

from __future__ import annotations

import ast
import fnmatch
import operator
import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from megatronlite.errors import UserError

PROGRAM = re.compile(r"(?:^|/)(pretrain_\w+\.py)$")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ASSIGNMENT = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(\+?)=")
HEREDOC = re.compile(r"(?<!<)<<-?\s*(['\"]?)([A-Za-z_]\w*)\1")
# words that end a command's arguments: control operators and redirections (`2>&1`, `>log`, `| tee`)
END_OF_COMMAND = re.compile(r"^(?:\||\|\||&&|&|;|\d*[<>]|&>)")
LAUNCHERS = ("torchrun", "torch.distributed.run", "torch.distributed.launch")  # whose options give the world size
DECLARE = ("export", "local", "declare", "typeset", "readonly")
BLOCK_OPEN = ("for", "while", "until", "select", "case")
EMPTY_WORD = "\x00"  # "${A[@]}" of an empty array: no word at all, not an empty one


@dataclass
class Invocation:
    """The `pretrain_*.py` command a script runs: Megatron's arguments and what launched it."""

    program: str  # pretrain_gpt.py
    argv: list[str]  # the words after it, up to the end of the command
    launcher: list[str]  # the words before it: torchrun and its options, python, srun ...
    line: int
    notes: list[str] = field(default_factory=list)

    @property
    def world_size(self) -> int | None:
        """torchrun's nproc-per-node x nnodes, where the launcher says both as numbers."""
        nproc, nnodes = _option(self.launcher, "nproc-per-node"), _option(self.launcher, "nnodes") or "1"
        if not any(w.endswith(LAUNCHERS) for w in self.launcher):
            return None
        return int(nproc) * int(nnodes) if (nproc or "").isdigit() and nnodes.isdigit() else None


def _option(words: list[str], name: str) -> str | None:
    """The value of a launcher option, spelled with dashes or underscores, `--opt V` or `--opt=V`."""
    spellings = {f"--{name}", f"--{name.replace('-', '_')}"}
    for i, word in enumerate(words):
        key, eq, value = word.partition("=")
        if key in spellings:
            return value if eq else (words[i + 1] if i + 1 < len(words) else None)
    return None


def read_script(path: Path, positional: list[str]) -> Invocation:
    """The first `pretrain_*.py` command `path` runs, its `$1 $2 ...` being `positional`."""
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        text = path.read_text()
    except (UnicodeDecodeError, OSError) as e:
        raise UserError(f"{path}: not a readable text file ({type(e).__name__})") from None
    return Shell(path, positional).run(text)


def statements(text: str) -> Iterator[tuple[int, str]]:
    """(line, text) of each simple statement: split at unquoted newlines and `;` outside parentheses and
    braces, with comments and backslash-newlines removed and here-documents skipped."""
    buf: list[str] = []
    quote, openers, line, start, i = None, [], 1, 1, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'":
            if text[i + 1 : i + 2] == "\n":
                i, line = i + 2, line + 1
                continue
            buf.append(text[i : i + 2])
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
            line += c == "\n"
            buf.append(c)
            i += 1
            continue
        prev = text[i - 1] if i else "\n"
        if c == "#" and prev in " \t\n;(":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if c in "'\"":
            quote = c
        elif c == "(" or (c == "{" and prev == "$"):
            openers.append(c)
        elif (c == ")" and openers[-1:] == ["("]) or (c == "}" and openers[-1:] == ["{"]):
            openers.pop()
        elif c in "\n;" and not openers:
            statement = "".join(buf).strip()
            if statement:
                yield start, statement
            buf = []
            if c == "\n":
                line += 1
                heredoc = HEREDOC.search(statement)
                if heredoc:  # skip the document's lines, through its terminator
                    end = re.compile(rf"^\t*{re.escape(heredoc[2])}[ \t]*$", re.M).search(text, i + 1)
                    skipped = text[i + 1 : end.end() if end else len(text)]
                    i, line = i + 1 + len(skipped), line + skipped.count("\n")
                    start = line
                    continue
            i += 1
            start = line
            continue
        line += c == "\n"  # a newline inside ( ) or ${ }
        buf.append(c)
        i += 1
    statement = "".join(buf).strip()
    if statement:
        yield start, statement


def raw_words(text: str) -> list[str]:
    """`text` split at unquoted blanks outside `( )` and `${ }`, quotes kept: to tell assignments from commands."""
    words, cur, quote, depth, i = [], [], None, 0, 0
    while i < len(text):
        c = text[i]
        if c == "\\" and quote != "'":
            cur.append(text[i : i + 2])
            i += 2
            continue
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "(" or (c == "{" and text[i - 1 : i] == "$"):
            depth += 1
        elif c in ")}" and depth:
            depth -= 1
        elif c in " \t\n" and not depth:
            if cur:
                words.append("".join(cur))
                cur = []
            i += 1
            continue
        cur.append(c)
        i += 1
    if cur:
        words.append("".join(cur))
    return words


def _closing(text: str, i: int, open_: str, close: str) -> int:
    """The index of the `close` that balances the `open_` just before `i` (quotes skipped), or -1."""
    depth, quote = 1, None
    while i < len(text):
        c = text[i]
        if quote:
            quote = None if c == quote else quote
        elif c in "'\"":
            quote = c
        elif c == "\\":
            i += 1
        elif text.startswith(open_, i):
            depth += 1
        elif text.startswith(close, i):
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return -1


def _dq(value: str) -> str:
    """`value` escaped for the inside of a double-quoted shlex word."""
    return value.replace("\\", "\\\\").replace('"', '\\"')


def _unquoted(value: str) -> str:
    """`value` as unquoted shell text, split into words as bash splits an unquoted expansion."""
    try:
        shlex.split(value)
        return value
    except ValueError:  # an unbalanced quote in the value: split at blanks only
        return " ".join(shlex.quote(w) for w in value.split())


_ARITHMETIC = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.floordiv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}


class Shell:
    """One script's interpretation: its variables, positional parameters, open blocks and notes."""

    def __init__(self, path: Path, positional: list[str]) -> None:
        self.path, self.positional = path, list(positional)
        self.vars: dict[str, str | list[str]] = {}
        self.notes: list[str] = []
        self.unknown = False  # set by an expansion that could not be evaluated (its text stays as written)
        self.line = 0

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)

    # --- running the statements ---------------------------------------------------------------------

    def run(self, text: str) -> Invocation:
        """Interpret `text` statement by statement up to its first pretrain_*.py command."""
        frames: list[list[bool]] = []  # per open `if`: [its enclosing code runs, a branch was taken, this one runs]
        blocks: list[str] = []  # open loops, cases and function bodies: never run
        for self.line, statement in statements(text):
            words = raw_words(statement)
            while words and words[0] in ("then", "do", "{"):  # `then CMD` on one line
                words = words[1:]
            if not words:
                continue
            keyword, runs = words[0], all(f[2] for f in frames) and not blocks
            if keyword == "if":
                frames.append([runs, False, False])
                self._branch(frames[-1], words[1:])
                continue
            if keyword == "elif" and frames:
                self._branch(frames[-1], words[1:])
                continue
            if keyword == "fi" and frames:
                frames.pop()
                continue
            if keyword == "else" and frames:
                frame = frames[-1]
                frame[1], frame[2] = True, frame[0] and not frame[1]
                words = words[1:]
                if not words:
                    continue
                keyword, runs = words[0], all(f[2] for f in frames) and not blocks
            if keyword in BLOCK_OPEN or keyword == "function" or re.fullmatch(r"\w+\(\)\{?", keyword):
                if runs:
                    name = keyword.rstrip("(){")
                    self.note(f"line {self.line}: a `{name}` block is not evaluated; the commands in it are not read")
                blocks.append(keyword)
                continue
            if keyword in ("done", "esac", "}") and blocks:
                blocks.pop()
                continue
            if not runs:
                continue
            if keyword == "exit":
                break
            invocation = self._statement(words, statement)
            if invocation:
                return self._finish(invocation)
        undecided = sum("cannot evaluate" in n for n in self.notes)
        hint = f"; {undecided} `if` condition(s) could not be evaluated and were taken as false" if undecided else ""
        raise UserError(
            f"{self.path}: no pretrain_*.py command found (a Megatron-LM script runs pretrain_gpt.py with "
            f"python or torchrun){hint}"
        )

    def _finish(self, invocation: Invocation) -> Invocation:
        """Note what in the command line could not be evaluated: its text was left as written."""
        left = list(dict.fromkeys(w for w in invocation.argv if "$" in w or "`" in w))
        if left:
            shown = ", ".join(left[:6]) + (", ..." if len(left) > 6 else "")
            positional = any(re.search(r"\$\{?[0-9@*]", w) for w in left)
            hint = " (the script's arguments: pass them after the script)" if positional else ""
            self.note(f"left as written, not evaluated: {shown}{hint}")
        invocation.notes = self.notes
        return invocation

    def _branch(self, frame: list[bool], condition: list[str]) -> None:
        """Run this `if`/`elif` branch when its enclosing code runs, no branch ran yet and the condition holds."""
        if not frame[0] or frame[1]:
            frame[2] = False
            return
        text = " ".join(condition)
        self.unknown = False
        words = self.words(text)
        result = None if self.unknown else self._test(words)
        if result is None:
            self.note(f"line {self.line}: cannot evaluate `{text}`; taken as false")
        frame[1] = frame[2] = bool(result)

    def _statement(self, words: list[str], text: str) -> Invocation | None:
        """One statement that runs: assignments are kept, `shift` shifts, a pretrain_*.py command is returned."""
        if words[0] in DECLARE:
            words = [w for w in words[1:] if not w.startswith("-")]
        assignments = 0
        while assignments < len(words) and ASSIGNMENT.match(words[assignments]):
            assignments += 1
        try:
            if assignments == len(words):
                for word in words:
                    self._assign(word)
                return None
            command = self.words(" ".join(words[assignments:]))  # leading assignments: the command's environment
        except UserError:
            if "pretrain_" in text:
                raise
            self.note(f"line {self.line}: could not read `{text[:60]}`; skipped")
            return None
        if command[:1] in (["source"], ["."]):
            self.note(f"line {self.line}: `{' '.join(command)}` is not read; what it sets is unknown here")
            return None
        if command[:1] == ["shift"]:
            count = int(command[1]) if len(command) > 1 and command[1].isdigit() else 1
            self.positional = self.positional[count:]
            return None
        return self._invocation(command)

    def _invocation(self, words: list[str]) -> Invocation | None:
        """The pretrain_*.py command among `words`, looking inside one-word commands (`bash -c "..."`, `eval`)."""
        for i, word in enumerate(words):
            match = PROGRAM.search(word)
            if match:
                end = next((j for j in range(i + 1, len(words)) if END_OF_COMMAND.match(words[j])), len(words))
                return Invocation(match[1], words[i + 1 : end], words[:i], self.line)
            if "pretrain_" in word and any(c.isspace() for c in word):
                try:
                    inner = self._invocation(shlex.split(word))
                except ValueError:
                    continue
                if inner:
                    return inner
        return None

    def _assign(self, word: str) -> None:
        """`NAME=value`, `NAME+=value`, `NAME=(a b)` or `NAME+=(c)`: arrays split into words, scalars kept whole."""
        match = ASSIGNMENT.match(word)
        name, append, value = match[1], match[2], word[match.end() :]
        old = self.vars.get(name)
        if value.startswith("(") and value.endswith(")"):
            items = self.words(value[1:-1])
            before = [] if old is None else [old] if isinstance(old, str) else old
            self.vars[name] = before + items if append else items
            return
        text = " ".join(self.words(value, split=False))
        if append and isinstance(old, list):
            self.vars[name] = [(old[0] if old else "") + text, *old[1:]]
        else:
            self.vars[name] = (old or "") + text if append else text

    # --- expansion ----------------------------------------------------------------------------------

    def words(self, text: str, split: bool = True) -> list[str]:
        """The words of `text` after expansion, unquoted by shlex; with `split=False` an expansion stays one word
        (the right-hand side of an assignment)."""
        shell_text = self.substitute(text, split)
        try:
            words = shlex.split(shell_text)
        except ValueError as e:
            raise UserError(f"{self.path} line {self.line}: {e} in {text[:80]!r}") from None
        return [w.replace(EMPTY_WORD, "") for w in words if w != EMPTY_WORD]

    def substitute(self, text: str, split: bool) -> str:
        """`text` with every `$...` and backquote expanded and re-quoted, so that shlex makes bash's words of it."""
        out, quote, i = [], None, 0
        while i < len(text):
            c = text[i]
            if quote == "'":
                quote = None if c == "'" else quote
            elif c == "\\":
                out.append(text[i : i + 2])
                i += 2
                continue
            elif c in "'\"" and quote in (None, c):
                quote = None if quote else c
            elif c in "$`":
                value, end = self._expansion(text, i)
                if value is not None:
                    out.append(self._insert(value, in_quotes=quote == '"', split=split))
                    i = end
                    continue
            out.append(c)
            i += 1
        return "".join(out)

    @staticmethod
    def _insert(value: str | list[str], in_quotes: bool, split: bool) -> str:
        """An expansion's value as shell text: one word in double quotes (one per element for `[@]`), else split."""
        if isinstance(value, list):
            if in_quotes:
                return '" "'.join(_dq(v) for v in value) if value else EMPTY_WORD
            value = " ".join(value)
        if in_quotes:
            return _dq(value)
        return _unquoted(value) if split else shlex.quote(value)

    def _expansion(self, text: str, i: int) -> tuple[str | list[str] | None, int]:
        """The value of the expansion starting at text[i] and the index after it; (None, i) for a lone `$`."""
        rest = text[i + 1 :]
        if text[i] == "`":
            end = text.find("`", i + 1)
            return self._opaque(text[i : end + 1 if end >= 0 else len(text)]), (end + 1 if end >= 0 else len(text))
        if rest.startswith("(("):
            end = _closing(text, i + 3, "((", "))")
            end = len(text) if end < 0 else end
            return self._arithmetic(text[i + 3 : end], text[i : end + 2]), end + 2
        for opener, closer in (("(", ")"), ("{", "}")):
            if rest.startswith(opener):
                end = _closing(text, i + 2, "$" + opener if opener == "{" else opener, closer)
                end = len(text) if end < 0 else end
                written = text[i : end + 1]
                value = self._opaque(written) if opener == "(" else self._braced(text[i + 2 : end], written)
                return value, end + 1
        match = NAME.match(rest) or re.match(r"[0-9@*#?$!-]", rest)
        if not match:
            return None, i
        return self._lookup(match[0], "$" + match[0]), i + 1 + match.end()

    def _opaque(self, written: str) -> str:
        """What is not evaluated (a command substitution, an unset variable): its text as written."""
        self.unknown = True
        return written

    def _is_set(self, name: str) -> bool:
        special = name in ("@", "*", "#", "0") or (name.isdigit() and int(name) <= len(self.positional))
        return special or name in self.vars

    def _lookup(self, name: str, written: str) -> str | list[str]:
        """A variable's value: positional parameters, `$@`, `$#`, the script's own variables (never the environment)."""
        if not self._is_set(name):
            return self._opaque(written)
        if name in ("@", "*"):
            return list(self.positional)
        if name == "#":
            return str(len(self.positional))
        if name == "0":
            return str(self.path)
        return self.positional[int(name) - 1] if name.isdigit() else self.vars[name]

    def _braced(self, body: str, written: str) -> str | list[str]:
        """`${NAME}`, `${NAME[@]}`, `${NAME[i]}`, `${#NAME[@]}` and the `:-`, `-`, `:=`, `=`, `:+`, `+` operators."""
        match = re.fullmatch(r"(#?)([A-Za-z_][A-Za-z0-9_]*|[0-9]+|[@*#])(?:\[([^\]]*)\])?(.*)", body, re.S)
        if not match:
            return self._opaque(written)
        length, name, index, operation = match.groups()
        if operation:
            op = re.match(r":?[-=+]", operation)
            if not op or length or index not in (None, "@", "*"):
                return self._opaque(written)
            present = self._is_set(name) and not (op[0].startswith(":") and self._value(name, index) in ("", []))
            word = " ".join(self.words(operation[op.end() :], split=False))
            if op[0].endswith("+"):
                return word if present else ""
            if present:
                return self._value(name, index)
            if op[0].endswith("="):
                self.vars[name] = word
            return word
        if not self._is_set(name):
            return [] if index in ("@", "*") else self._opaque(written)
        value = self._value(name, index)
        return str(len(value)) if length else value

    def _value(self, name: str, index: str | None) -> str | list[str]:
        """A set variable's value: `[@]` the whole array, `[k]` one element, no index element 0."""
        value = self._lookup(name, name)
        items = value if isinstance(value, list) else [value]
        if index in ("@", "*"):
            return items
        k = int(index) if index and index.isdigit() else 0
        return items[k] if k < len(items) else ""

    def _arithmetic(self, expression: str, written: str) -> str:
        """`$(( ))` over integers and variables holding integers; anything else is left as written."""
        before, self.unknown = self.unknown, False
        text = " ".join(self.words(expression, split=False))
        text = NAME.sub(lambda m: str(self._value(m[0], None)) if self._is_set(m[0]) else self._opaque(m[0]), text)
        known, self.unknown = not self.unknown, before
        try:
            if not known:
                raise ValueError(text)
            return str(self._evaluate(ast.parse(text.replace("//", "/").replace("/", "//"), mode="eval").body))
        except (ValueError, SyntaxError, TypeError, ZeroDivisionError, OverflowError):
            return self._opaque(written)

    def _evaluate(self, node: ast.AST) -> int:
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITHMETIC:
            return _ARITHMETIC[type(node.op)](self._evaluate(node.left), self._evaluate(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self._evaluate(node.operand)
            return -value if isinstance(node.op, ast.USub) else value
        raise ValueError(ast.dump(node))

    # --- conditions -----------------------------------------------------------------------------------

    def _test(self, words: list[str]) -> bool | None:
        """`[[ a == b ]] || [ -z "$x" ] && ...` evaluated left to right, as bash does; None: cannot tell."""
        result: bool | None = None
        op, group = None, []
        for word in [*words, "&&"]:
            if word not in ("&&", "||"):
                group.append(word)
                continue
            value = _group(group)
            if op is None:
                result = value
            elif op == "&&":
                result = False if False in (result, value) else None if None in (result, value) else True
            else:
                result = True if True in (result, value) else None if None in (result, value) else False
            op, group = word, []
        return result


def _group(words: list[str]) -> bool | None:
    """One `[[ ... ]]`, `[ ... ]`, `test ...`, `true` or `false`, possibly negated; None for any other command."""
    negate = False
    while words[:1] == ["!"]:
        negate, words = not negate, words[1:]
    if words[:1] in (["[["], ["["]) and words[-1:] in (["]]"], ["]"]):
        result = _compare(words[1:-1], glob=words[0] == "[[")
    elif words[:1] == ["test"]:
        result = _compare(words[1:], glob=False)
    else:
        result = {"true": True, "false": False}.get(" ".join(words))
    return None if result is None else result != negate


_NUMERIC = {"-eq": operator.eq, "-ne": operator.ne, "-lt": operator.lt, "-le": operator.le, "-gt": operator.gt}
_NUMERIC["-ge"] = operator.ge


def _compare(words: list[str], glob: bool) -> bool | None:
    """A test's operands: string (in)equality (a pattern inside `[[ ]]`), -z/-n, integer comparisons."""
    if words[:1] == ["!"]:
        inner = _compare(words[1:], glob)
        return None if inner is None else not inner
    if len(words) == 1:
        return words[0] != ""
    if len(words) == 2 and words[0] in ("-z", "-n"):
        return (words[1] == "") == (words[0] == "-z")
    if len(words) != 3:
        return None  # file tests (-f, -d) and the rest: not known without running the script
    a, op, b = words
    if op in ("=", "==", "!="):
        equal = fnmatch.fnmatchcase(a, b) if glob else a == b
        return equal == (op != "!=")
    if op in _NUMERIC and re.fullmatch(r"-?\d+", a) and re.fullmatch(r"-?\d+", b):
        return _NUMERIC[op](int(a), int(b))
    return None
