"""The two answer normalisers of DeepScaleR's grader and the helpers around them.

DeepScaleR (``deepscaler/rewards/math_utils/utils.py``) calls an answer correct if
either normaliser makes it equal to the gold answer:

* :func:`normalize_mathd` - Hendrycks' MATH ``_strip_string``: textual LaTeX clean-up
  (``\\dfrac`` -> ``\\frac``, units after ``\\text{ ``, ``\\frac12`` -> ``\\frac{1}{2}``,
  ``0.5`` -> ``\\frac{1}{2}``, ``a/b`` -> ``\\frac{a}{b}``, ...), then plain string equality.
* :func:`normalize_sympy` - PRM800K's ``_normalize``: strips units, ``$``, ``%``, turns LaTeX
  into plain text with pylatexenc, lower-cases, canonicalises integers; its output is
  compared as a string and then, element by element, with sympy (see ``reward.py``).

Both are ported step by step, quirks included (substring-based unit removal, the
unescaped ``.`` in the fraction regex, integer truncation after ``float()``), because the
reward has to give the verdicts DeepScaleR was trained and evaluated with.  The order of the
steps matters; each function lists them in the original order.

Also here: :func:`split_tuple` (tuple/interval splitting), :func:`should_allow_eval`
(the gate in front of sympy) and the integer/fraction string tests.
"""

from __future__ import annotations

import functools
import logging
import re

from pylatexenc.latex2text import LatexNodes2Text

# pylatexenc logs a warning for every malformed macro (e.g. "\frac{1}"); a policy in
# training produces thousands of those, and the original ignores them too.
logging.getLogger("pylatexenc").setLevel(logging.ERROR)

_TEXT_WRAPPED = re.compile(r"^\\text\{(?P<text>.+?)\}$")

# Both normalisers are pure functions of a string, and answers repeat a lot in RL (a group's
# samples share the gold answer and often agree), while pylatexenc costs ~0.5 ms per LaTeX
# answer: remember the results for short strings.  32K entries of <= 256 chars: < 20 MB.
_CACHED_MAX_CHARS = 256
_CACHE_ENTRIES = 32_768


def clear_caches() -> None:
    """Forget remembered normalisations (for benchmarks that must not measure cache hits)."""
    _normalize_mathd_cached.cache_clear()
    _normalize_sympy_cached.cache_clear()


class _MalformedAnswer(Exception):
    """Raised where Hendrycks' code would hit an IndexError / failed assert."""


# ---------------------------------------------------------------------------
# Hendrycks MATH ("mathd") normaliser
# ---------------------------------------------------------------------------


def normalize_mathd(answer: str | None) -> str | None:
    """Hendrycks' answer normalisation; on malformed input the stripped answer is returned."""
    if answer is None:
        return None
    if len(answer) <= _CACHED_MAX_CHARS:
        return _normalize_mathd_cached(answer)
    return _normalize_mathd(answer)


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _normalize_mathd_cached(answer: str) -> str:
    return _normalize_mathd(answer)


def _normalize_mathd(answer: str) -> str:
    answer = answer.strip()
    wrapped = _TEXT_WRAPPED.search(answer)
    if wrapped is not None:
        answer = wrapped.group("text").strip()
    try:
        return _strip_string(answer)
    except _MalformedAnswer:
        return answer


def _strip_string(string: str) -> str:
    string = string.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    string = string.replace("tfrac", "frac").replace("dfrac", "frac")
    string = string.replace("\\left", "").replace("\\right", "")
    string = string.replace("^{\\circ}", "").replace("^\\circ", "")
    string = string.replace("\\$", "")
    string = _remove_right_units(string)
    string = string.replace("\\%", "")
    # ".5" and "0.5" are the same answer.
    string = string.replace(" .", " 0.").replace("{.", "{0.")
    if not string:
        return string
    if string[0] == ".":
        string = "0" + string
    string = _drop_short_equation_lhs(string)
    string = _brace_sqrt_argument(string)
    string = string.replace(" ", "")
    string = _brace_frac_arguments(string)
    if string == "0.5":
        string = "\\frac{1}{2}"
    return _int_slash_int_to_frac(string)


def _remove_right_units(string: str) -> str:
    # In MATH, "\text{ " (with the space) only ever introduces a unit.
    if "\\text{ " not in string:
        return string
    parts = string.split("\\text{ ")
    if len(parts) != 2:
        raise _MalformedAnswer("several '\\text{ ' units")
    return parts[0]


def _drop_short_equation_lhs(string: str) -> str:
    # "k = 5" -> " 5"; a longer left side ("xy + 1 = 5") is kept.
    sides = string.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:
        return sides[1]
    return string


def _brace_sqrt_argument(string: str) -> str:
    # "\sqrt3" -> "\sqrt{3}" (one character only, as the original).
    head, *pieces = string.split("\\sqrt")
    rebuilt = [head]
    for piece in pieces:
        if not piece:
            raise _MalformedAnswer("\\sqrt at the end")
        if piece[0] != "{":
            piece = "{" + piece[0] + "}" + piece[1:]
        rebuilt.append("\\sqrt" + piece)
    return "".join(rebuilt)


def _brace_frac_arguments(string: str) -> str:
    # "\frac12" -> "\frac{1}{2}", "\frac1{72}" -> "\frac{1}{72}".
    head, *pieces = string.split("\\frac")
    rebuilt = [head]
    for piece in pieces:
        rebuilt.append("\\frac")
        if not piece:
            raise _MalformedAnswer("\\frac at the end")
        if piece[0] == "{":
            rebuilt.append(piece)
            continue
        if len(piece) < 2:
            return string  # the original gives up and keeps the whole string
        numerator, second, rest = piece[0], piece[1], piece[2:]
        if second == "{":
            rebuilt.append("{" + numerator + "}{" + rest)
        else:
            rebuilt.append("{" + numerator + "}{" + second + "}" + rest)
    return "".join(rebuilt)


def _int_slash_int_to_frac(string: str) -> str:
    parts = string.split("/")
    if len(parts) != 2:
        return string
    try:
        numerator, denominator = int(parts[0]), int(parts[1])
    except ValueError:
        return string
    # Only canonical "a/b" ("05/2" and "+1/2" stay as they are).
    if string != f"{numerator}/{denominator}":
        return string
    return f"\\frac{{{numerator}}}{{{denominator}}}"


# ---------------------------------------------------------------------------
# PRM800K ("sympy") normaliser
# ---------------------------------------------------------------------------

_UNIT_WORDS = (
    "degree", "cm", "centimeter", "meter", "mile", "second", "minute", "hour", "day",
    "week", "month", "year", "foot", "feet", "inch", "yard",
)
# Substring-based on purpose: "today" loses its "day" in the original too.
_UNIT_PATTERNS = tuple(re.compile(unit + r"(es)?(s)? *(\^[0-9]+)?") for unit in _UNIT_WORDS)
_DEGREE_SIGN = re.compile(r"\^ *\\circ")
_THIN_SPACE_COMMA = re.compile(r",\\! *")
_MIXED_NUMBER = re.compile(r"([0-9]) +([0-9])")
_THOUSANDS_COMMA = re.compile(r"(\d)(,)(\d\d\d)($|\D)")
_FRACTION = re.compile(r"^-?[0-9]+.?/0*[1-9][0-9]*.?$")  # unescaped "." as in the original

_LATEX_TO_TEXT = LatexNodes2Text()
_UNICODE_TO_ASCII = (("√", "sqrt"), ("π", "pi"), ("∞", "inf"), ("∪", "U"), ("·", "*"), ("×", "*"))


def normalize_sympy(expr: str | None) -> str | None:
    """PRM800K's answer normalisation (input of the sympy comparison)."""
    if expr is None:
        return None
    if len(expr) <= _CACHED_MAX_CHARS:
        return _normalize_sympy_cached(expr)
    return _normalize_sympy(expr)


@functools.lru_cache(maxsize=_CACHE_ENTRIES)
def _normalize_sympy_cached(expr: str) -> str:
    return _normalize_sympy(expr)


def _normalize_sympy(expr: str) -> str:
    wrapped = _TEXT_WRAPPED.search(expr)
    if wrapped is not None:
        expr = wrapped.group("text")
    expr = expr.replace("\\%", "%").replace("\\$", "$").replace("$", "").replace("%", "")
    expr = expr.replace(" or ", " , ").replace(" and ", " , ")
    expr = expr.replace("million", "*10^6").replace("billion", "*10^9").replace("trillion", "*10^12")
    for unit in _UNIT_PATTERNS:
        expr = unit.sub("", expr)
    expr = _DEGREE_SIGN.sub("", expr)
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1]
    expr = _THIN_SPACE_COMMA.sub("", expr)
    if _is_float(expr) and _float_is_int(float(expr)):
        expr = str(int(round(float(expr))))
    if "\\" in expr:
        expr = _latex_to_plain_text(expr)
    expr = re.sub("- *", "-", expr)
    expr = _MIXED_NUMBER.sub(r"\1+\2", expr)  # "7 3/4" -> "7+3/4"
    expr = expr.replace(" ", "").replace("{", "").replace("}", "")
    expr = expr.lower()
    if is_integer_string(expr):
        expr = str(integer_string_value(expr))
    return expr


def _latex_to_plain_text(expr: str) -> str:
    # pylatexenc drops \dfrac's arguments ("\dfrac{3}{4}" -> "34"), hence the replacement;
    # the leading space keeps "7\frac{3}{4}" a mixed number ("7 3/4").
    expr = expr.replace("\\tfrac", "\\frac").replace("\\dfrac", "\\frac").replace("\\frac", " \\frac")
    try:
        expr = _LATEX_TO_TEXT.latex_to_text(expr)
    except Exception:  # the original ignores every pylatexenc failure
        return expr
    for unicode_char, ascii_text in _UNICODE_TO_ASCII:
        expr = expr.replace(unicode_char, ascii_text)
    return expr.strip()


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _float_is_int(value: float) -> bool:
    try:
        return abs(value - int(round(value))) <= 1e-7
    except (OverflowError, ValueError):  # inf, nan
        return False


def strip_thousands_commas(expr: str) -> str:
    """``1,234,567`` -> ``1234567``; tuple commas (``1,2``) are kept."""
    while True:
        stripped = _THOUSANDS_COMMA.sub(r"\1\3\4", expr)
        if stripped == expr:
            return stripped
        expr = stripped


def is_integer_string(expr: str) -> bool:
    """True if the text (thousands commas allowed) is a float within 1e-7 of an integer."""
    try:
        return _float_is_int(float(strip_thousands_commas(expr)))
    except ValueError:
        return False


def integer_string_value(expr: str) -> int:
    # Truncates ("4.99999999" -> 4), as the original's int(float(x)) does.
    return int(float(expr.replace(",", "")))


def is_fraction_string(expr: str) -> bool:
    return _FRACTION.search(expr) is not None


# ---------------------------------------------------------------------------
# Tuples and the sympy gate
# ---------------------------------------------------------------------------

_TUPLE_CHARS = "()[]"
_BAD_SUBSTRINGS = ("^{", "^(")
_BAD_REGEXES = (re.compile(r"\^[0-9]+\^"), re.compile(r"\^[0-9][0-9]+"))


def split_tuple(expr: str) -> list[str]:
    """``(1,2)`` / ``[0,1)`` -> elements; anything else is a single element."""
    expr = strip_thousands_commas(expr)
    if not expr:
        return []
    is_bracketed = (
        len(expr) > 2
        and expr[0] in _TUPLE_CHARS
        and expr[-1] in _TUPLE_CHARS
        and not any(char in expr[1:-1] for char in _TUPLE_CHARS)
    )
    if is_bracketed:
        return [element.strip() for element in expr[1:-1].split(",")]
    return [expr]


def count_unknown_letters(expr: str) -> int:
    expr = expr.replace("sqrt", "").replace("frac", "")
    return len({char for char in expr if char.isalpha()})


def should_allow_eval(expr: str) -> bool:
    """The original's gate in front of sympy: few variables and no large/nested powers."""
    if count_unknown_letters(expr) > 2:
        return False
    if any(bad in expr for bad in _BAD_SUBSTRINGS):
        return False
    return not any(pattern.search(expr) for pattern in _BAD_REGEXES)
