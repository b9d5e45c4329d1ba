"""Safe, bounded parser from a normalised answer string to a sympy expression.

Why this exists
---------------
DeepScaleR's grader compares two answers by handing ``"(gold)-(pred)"`` to
``sympy.parsing.sympy_parser.parse_expr`` (standard transformations plus
``implicit_multiplication_application``) and simplifying the result.
``parse_expr`` ends in Python ``eval``, so model-written text is executed, and
nothing bounds ``9**9**9**9``-style expressions, so one answer can hang a worker.
This module replaces that call: a small tokenizer and recursive-descent parser
that builds sympy objects directly (``Integer``, ``Float``, ``Symbol``, ``pi``,
``sqrt``, ``factorial``, the elementary functions and the arithmetic operators on
them).  Nothing is ever evaluated as Python, and anything outside the grammar raises
:class:`UnsupportedExpression`, which the grader treats as "not equal" - exactly
what the original does when ``parse_expr`` or ``simplify`` raises.

Grammar (Python precedence, as ``parse_expr`` sees the text after ``^`` -> ``**``)::

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/') unary | <implicit *> power)*
    unary   := ('+' | '-') unary | power
    power   := postfix (('**' | '^') unary)?          # right-associative
    postfix := atom '!'?                               # factorial
    atom    := NUMBER | NAME | 'sqrt' '(' expr ')' | '(' expr ')'
             | FUNCTION ('^' EXPONENT)? '(' expr ')'   # ln(2), sin^2(x) = sin(x)**2
    EXPONENT:= ('+' | '-')* (NUMBER | NAME | '(' expr ')')

Implicit multiplication is inserted wherever an atom directly follows an atom
or ``)``: ``2x``, ``2sqrt(3)``, ``(a)(b)``, ``x(2)``, ``x^2y`` = ``x**2*y``.

Names follow sympy's ``auto_symbol`` + ``split_symbols`` rules:

* ``pi`` is ``sympy.pi``; ``sqrt`` is the square root and must be called.
* the elementary functions of sympy's namespace are functions when they are the
  whole name and are called: ``exp``, ``log`` and ``ln`` (both the natural log),
  ``sin cos tan cot sec csc``, their ``a``-prefixed inverses, the hyperbolic
  ones and their inverses.  ``lnx`` or ``sinx`` are split into letters as
  sympy does.  (Note the grader's ``should_allow_eval`` gate admits at most two
  distinct letters, so in grading only ``ln`` can pass it, as in the original.)
* ``e``, ``i`` and every other lowercase letter are plain symbols: the grader
  lower-cases answers and sympy's namespace has only ``E`` and ``I``.
* a name made of several letters/digits is split into single-letter symbols and
  digit runs (``xy`` -> ``x*y``, ``x2`` -> ``x*2``, ``sqrt2`` -> ``s*q*r*t*2``),
  except names that are Greek letters (``mu``) or contain ``_`` (``a_1``), which
  stay one symbol.
* any other name sympy knows (``oo``, ``re``, ``floor``, ``frac``, ``E``, ...) and
  Python keywords (``in``, ``if``, ``or``, ...) are rejected.

Numbers are read as Python's tokenizer reads them, quirks included: ``1.5``,
``.5``, ``2.`` and ``1e-3`` are ``Float``; ``2j`` is ``2*I``; ``012`` is ``0`` then
``12``, i.e. ``0*12``.

Known differences from ``parse_expr``: ``!!`` (double factorial), hex/octal/binary
literals, lists, tuples, comparisons, ``//``, ``%``, functions of two arguments
(``log(8,2)``), non-elementary functions, an uncalled function name (``ln``) and
implicit application (``sin^2x``) are refused instead of evaluated (refusing only
ever turns a verdict into "not equal"), and ``x(n)!`` is ``x*factorial(n)`` where
``parse_expr`` raises.
Checked when this was written, on the distinct normalised answers of the five test
sets and the MATH/AIME training files that pass ``should_allow_eval``: 2,630 give
identical expressions, 216 fail in both, 171 are tuples (a Python tuple for
``parse_expr``, refused here; the grader's ``tuple - tuple`` fails either way), and
one is ``d!/2k(d-k)!``.  Grading 5,060 answer pairs from those files gave identical
verdicts, random expressions showed no other differences, and no answer there hits
a bound.

Bounds, so that parsing and the later ``simplify`` always end quickly: input
length, exponents (and every number inside a symbolic exponent), the bit size of
exact powers, roots of huge integers, factorial arguments, float-literal
exponents, and a crude rational-function degree of the whole expression
(``simplify`` expands products and brings sums to one fraction); for functions:
at most MAX_FUNCTIONS of them nested at most MAX_FUNCTION_NESTING deep, the
numbers inside exp-like arguments within MAX_EXPONENT (also after sympy merges
them: ``exp(1000)^1000`` is ``exp(1000000)``), no exponential inside a numeric
exponent or exp argument (``exp(exp(exp(1000)))``, ``2^(2^(1000pi))``), and no
huge numbers inside logs and trigonometric functions.  Inputs past a
bound are refused, i.e. "not equal"; real answers stay far inside them.
"""

from __future__ import annotations

import keyword
import math
import re
import unicodedata
from dataclasses import dataclass

import sympy

MAX_INPUT_CHARS = 1_000
# |n| above this in x**n is rejected for non-rational x (symbols, pi, radicals, floats).
MAX_EXPONENT = 1_000
# Exact rational powers may not produce numbers wider than this (numerator or denominator):
# 2**20000 is fine, 9**9**9 is not.
MAX_POWER_BITS = 20_000
# Fractional powers (roots) only of rationals up to this size; sympy factors the base.
MAX_ROOT_BASE_BITS = 1_000
# n! is only computed for n up to this (1000! has 2,568 digits).
MAX_FACTORIAL = 1_000
# Float literals like 1e400 are fine for mpmath, but keep them sane anyway.
MAX_FLOAT_EXPONENT = 1_000
# Elementary functions may nest this deep (ln(ln(2)) is 2); sympy's simplify tries rewrites of
# every function it meets, so deep towers cost a lot and no real answer has them.
MAX_FUNCTION_NESTING = 3
# ... and appear this often in one expression: simplify's trigonometric search grows fast with
# their number (on one CPU core: 8 sines of multiple angles ~2 s, 5 ~0.2 s).
MAX_FUNCTIONS = 6
# Bound on degree_bound(): simplify() expands products and brings sums to one fraction,
# and its cost grows fast with the degree (on one CPU core: (x+y+1)**32 or a product of 32
# linear factors takes ~1-10 s, degree 12 ~0.3 s).  Real answers have degree < 10.
MAX_DEGREE = 12


class UnsupportedExpression(ValueError):
    """The text is outside the safe grammar or exceeds a size bound."""


@dataclass(frozen=True)
class _Token:
    kind: str  # "num", "name", "op"; after name expansion also "symbol" and "value"
    text: str
    value: sympy.Expr | None = None


# Python's number tokens, in the order Python's tokenizer tries them: imaginary, float,
# integer.  An integer with a leading zero is cut like Python cuts it ("012" is "0" then "12").
_FLOAT = r"(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+"
_NUMBER = re.compile(rf"(?:{_FLOAT}|[0-9]+)[jJ]|{_FLOAT}|0+|[1-9][0-9]*")
# Python reads these as hex/octal/binary integers; we refuse them rather than guess.
_PREFIXED_INTEGER = re.compile(r"0(?:[xX][0-9a-fA-F]|[oO][0-7]|[bB][01])")
_NAME = re.compile(r"[^\W\d_](?:[^\W\d_]|[0-9_])*")
_OPERATORS = ("**", "+", "-", "*", "/", "^", "(", ")", "!")
_SYMPY_NAMES = frozenset(sympy.__all__)

# The elementary functions sympy's parse_expr knows by these names (its namespace: ``ln`` is
# ``log``), each called with one parenthesised argument.  Every other sympy name (floor, gamma,
# binomial, Abs, ...) stays refused.
_FUNCTIONS = {name: getattr(sympy, name) for name in (
    "exp", "log", "sin", "cos", "tan", "cot", "sec", "csc", "asin", "acos", "atan", "acot", "asec", "acsc",
    "sinh", "cosh", "tanh", "coth", "sech", "csch", "asinh", "acosh", "atanh", "acoth", "asech", "acsch",
)} | {"ln": sympy.log}
_FUNCTION_CLASSES = tuple(set(_FUNCTIONS.values()))
# Functions that grow like exp (simplify rewrites the hyperbolic ones as exp): their argument is
# bounded as an exponent is, and a numeric argument may not hold another exponential, since
# exp(exp(exp(1000))) has a value that no evaluation could hold.
_EXPONENTIALS = (sympy.exp, sympy.sinh, sympy.cosh, sympy.tanh, sympy.coth, sympy.sech, sympy.csch)


def tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        if _PREFIXED_INTEGER.match(text, pos):
            raise UnsupportedExpression("hex/octal/binary literal")
        number = _NUMBER.match(text, pos)
        if number:
            tokens.extend(_number_tokens(number.group()))
            pos = number.end()
            continue
        name = _NAME.match(text, pos)
        if name:
            tokens.append(_Token("name", name.group()))
            pos = name.end()
            continue
        for op in _OPERATORS:
            if text.startswith(op, pos):
                # "^" is Python's "**" after the grader's text replacement.
                tokens.append(_Token("op", "**" if op == "^" else op))
                pos += len(op)
                break
        else:
            raise UnsupportedExpression(f"unexpected character {text[pos]!r}")
    return tokens


def _number_tokens(text: str) -> list[_Token]:
    if text[-1] not in "jJ":
        return [_Token("num", text)]
    # sympy's auto_number turns "2j" into "2*I" at token level, so "9^2j" is 9**2*I.
    mantissa = text[:-1]
    if re.fullmatch(r"0[0-9]*[1-9][0-9]*", mantissa):
        raise UnsupportedExpression("leading zero in an integer literal")  # Integer(01) is a SyntaxError
    return [_Token("num", mantissa), _Token("op", "*"), _Token("imag", "I")]


def _is_greek_letter_name(name: str) -> bool:
    try:
        unicodedata.lookup("GREEK SMALL LETTER " + name)
    except KeyError:
        return False
    return True


def _expand_name(name: str) -> list[_Token]:
    """Split a name the way sympy's auto_symbol + split_symbols would."""
    if keyword.iskeyword(name) or name.startswith("_"):
        raise UnsupportedExpression(f"name {name!r} is not allowed")
    if name in ("pi", "sqrt"):
        return [_Token("name", name)]
    if name in _FUNCTIONS:  # only the whole name: "lnx" is l*n*x for parse_expr too
        return [_Token("function", name)]
    if name in _SYMPY_NAMES:
        raise UnsupportedExpression(f"sympy name {name!r} is outside the whitelist")
    if len(name) == 1 or "_" in name or _is_greek_letter_name(name):
        return [_Token("symbol", name)]
    pieces: list[_Token] = []
    for run in re.findall(r"[0-9]+|[^0-9]", name):
        if run.isdigit():
            if run[0] == "0" and len(run) > 1 and run.strip("0"):
                raise UnsupportedExpression(f"digit run {run!r} in a name")  # sympy.Number('03') fails
            pieces.append(_Token("num", run))
        elif run in _SYMPY_NAMES:  # only upper-case E, I, N, O, Q, S
            raise UnsupportedExpression(f"sympy name {run!r} is outside the whitelist")
        else:
            pieces.append(_Token("symbol", run))
    return pieces


def _number(text: str) -> sympy.Expr:
    # Same objects as sympy's auto_number: Float('...') for anything with "." or an exponent.
    if "." in text or "e" in text or "E" in text:
        mantissa_exponent = re.split("[eE]", text)
        if len(mantissa_exponent) == 2 and abs(int(mantissa_exponent[1])) > MAX_FLOAT_EXPONENT:
            raise UnsupportedExpression("float literal exponent too large")
        return sympy.Float(text)
    if len(text) > 4_000:  # Python's int() refuses longer strings anyway
        raise UnsupportedExpression("integer literal too long")
    return sympy.Integer(int(text))


def _rational_bits(value: sympy.Rational) -> int:
    return max(abs(int(value.p)).bit_length(), int(value.q).bit_length())


def _check_power(base: sympy.Expr, exponent: sympy.Expr) -> None:
    if exponent.is_Rational or exponent.is_Float:
        magnitude = abs(exponent)
        if base.is_Rational:
            # Exact powers are computed at once, so bound the size of the result.
            if _rational_bits(base) * math.ceil(magnitude) > MAX_POWER_BITS:
                raise UnsupportedExpression("power result too large")
            # Roots of huge integers make sympy try to factor them.
            if not exponent.is_Integer and _rational_bits(base) > MAX_ROOT_BASE_BITS:
                raise UnsupportedExpression("root of a huge number")
        elif magnitude > MAX_EXPONENT:
            raise UnsupportedExpression("exponent too large")
        return
    # Symbolic or irrational exponent: simplify's powsimp splits 2**(10**100*sqrt(2)) into
    # 2**(10**100) * ... and evaluates that, so bound every number inside the exponent.
    largest = max((_number_size(number) for number in exponent.atoms(sympy.Number)), default=0)
    if largest > MAX_EXPONENT:
        raise UnsupportedExpression("number in exponent too large")
    if base.is_Rational and _rational_bits(base) * math.ceil(largest) > MAX_POWER_BITS:
        raise UnsupportedExpression("power result too large")


def _number_size(number: sympy.Number) -> float:
    if number.is_Rational:
        return max(abs(int(number.p)), int(number.q))
    return abs(float(number)) if number.is_finite else math.inf


def _power(base: sympy.Expr, exponent: sympy.Expr) -> sympy.Expr:
    _check_power(base, exponent)
    if base.is_number and exponent.is_number and not exponent.is_Rational and _has_exponential(exponent):
        raise UnsupportedExpression("tower of exponentials")  # 2^(2^(1000pi)): no value fits anywhere
    value = base**exponent
    if value.has(*_EXPONENTIALS):
        _check_exponentials(value)
    return value


def _has_exponential(expr: sympy.Basic) -> bool:
    """Whether expr holds an exponential: exp-like function, or a power with a non-rational exponent."""
    return any(isinstance(node, _EXPONENTIALS) or (node.is_Pow and not node.exp.is_Rational)
               for node in sympy.preorder_traversal(expr))


def _check_exponentials(expr: sympy.Basic) -> None:
    """Every exp-like function's argument keeps its numbers within MAX_EXPONENT, also after sympy
    merged it: exp(1000)^1000 is exp(1000000), and sin of that could never be evaluated."""
    for node in sympy.preorder_traversal(expr):
        if isinstance(node, _EXPONENTIALS):
            if max((_number_size(number) for number in node.args[0].atoms(sympy.Number)), default=0) > MAX_EXPONENT:
                raise UnsupportedExpression("number in an exponential's argument too large")


def _function_depth(expr: sympy.Basic) -> int:
    depth = max((_function_depth(arg) for arg in expr.args), default=0)
    return depth + 1 if isinstance(expr, sympy.Function) else depth


def _apply_function(name: str, argument: sympy.Expr) -> sympy.Expr:
    function = _FUNCTIONS[name]
    largest = max((_number_size(number) for number in argument.atoms(sympy.Number)), default=0)
    if function in _EXPONENTIALS:
        if largest > MAX_EXPONENT:
            raise UnsupportedExpression(f"number in the argument of {name} too large")
        if argument.is_number and _has_exponential(argument):
            raise UnsupportedExpression("tower of exponentials")
    elif largest > 2.0**MAX_ROOT_BASE_BITS:  # logs and trig functions of huge numbers
        raise UnsupportedExpression(f"number in the argument of {name} too large")
    if _function_depth(argument) >= MAX_FUNCTION_NESTING:
        raise UnsupportedExpression("functions nested too deeply")
    _check_exponentials(argument)
    value = function(argument)
    _check_exponentials(value)
    return value


def _factorial(argument: sympy.Expr) -> sympy.Expr:
    if argument.is_number and argument.is_real and argument.is_finite:
        if abs(argument) > MAX_FACTORIAL:
            raise UnsupportedExpression("factorial argument too large")
    return sympy.factorial(argument)


def degree_bound(expr: sympy.Basic) -> int:
    """Crude bound on the degree ``simplify`` may meet after bringing ``expr`` to one fraction.

    Rationals and floats count 0; symbols, pi, I and radicals count 1.  A sum of fractions
    adds up its denominators' degrees (``1/(x+1) + ... + 1/(x+30)`` has degree 30), as
    ``together``/``cancel`` inside ``simplify`` multiply them out.  Only used to refuse
    inputs that would make ``simplify`` slow; real answers stay far below the limit.
    """
    numerator, denominator = _rational_degrees(expr)
    return numerator + denominator


def _rational_degrees(expr: sympy.Basic) -> tuple[int, int]:
    """(numerator degree, denominator degree) upper bounds of ``expr`` as one fraction."""
    if expr.is_Rational or expr.is_Float:
        return 0, 0
    if expr.is_Atom:
        return 1, 0
    if expr.is_Add or expr.is_Mul:
        parts = [_rational_degrees(arg) for arg in expr.args]
        denominator = sum(den for _, den in parts)
        if expr.is_Mul:
            return sum(num for num, _ in parts), denominator
        # a/b + c/d = (ad + cb)/(bd)
        return max(num + denominator - den for num, den in parts), denominator
    if expr.is_Pow and expr.exp.is_Integer:
        numerator, denominator = _rational_degrees(expr.base)
        power = abs(int(expr.exp))
        if expr.exp < 0:
            numerator, denominator = denominator, numerator
        return numerator * power, denominator * power
    # Roots, symbolic exponents, factorials: a new atom built from its arguments.
    return 1 + sum(degree_bound(arg) for arg in expr.args), 0


class _Parser:
    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def peek_op(self, *ops: str) -> bool:
        token = self.peek()
        return token is not None and token.kind == "op" and token.text in ops

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise UnsupportedExpression("unexpected end of input")
        self.pos += 1
        return token

    def expect_op(self, op: str) -> None:
        token = self.take()
        if token.kind != "op" or token.text != op:
            raise UnsupportedExpression(f"expected {op!r}, got {token.text!r}")

    def starts_atom(self) -> bool:
        token = self.peek()
        if token is None:
            return False
        return token.kind != "op" or token.text == "("

    def parse(self) -> sympy.Expr:
        expr = self.expr()
        if self.peek() is not None:
            raise UnsupportedExpression(f"unexpected token {self.peek().text!r}")
        return expr

    def expr(self) -> sympy.Expr:
        value = self.term()
        while self.peek_op("+", "-"):
            op = self.take().text
            right = self.term()
            value = value + right if op == "+" else value - right
        return value

    def term(self) -> sympy.Expr:
        value = self.unary()
        while True:
            if self.peek_op("*", "/"):
                op = self.take().text
                right = self.unary()
                value = value * right if op == "*" else value / right
            elif self.starts_atom():
                value = value * self.power()
            else:
                return value

    def unary(self) -> sympy.Expr:
        if self.peek_op("+", "-"):
            op = self.take().text
            operand = self.unary()
            return operand if op == "+" else -operand
        return self.power()

    def power(self) -> sympy.Expr:
        base = self.postfix()
        if self.peek_op("**"):
            self.take()
            return _power(base, self.unary())
        return base

    def postfix(self) -> sympy.Expr:
        value = self.atom()
        if self.peek_op("!"):
            self.take()
            if self.peek_op("!"):
                raise UnsupportedExpression("double factorial is not supported")
            value = _factorial(value)
        return value

    def atom(self) -> sympy.Expr:
        token = self.take()
        if token.kind == "name":
            token = self.expand_name(token)
        if token.kind == "num":
            return _number(token.text)
        if token.kind == "symbol":
            return sympy.Symbol(token.text)
        if token.kind == "value":
            return token.value
        if token.kind == "imag":
            return sympy.I
        if token.kind == "name" and token.text == "pi":
            return sympy.pi
        if token.kind == "function":
            return self.function_call(token.text)
        if token.kind == "name" and token.text == "sqrt":
            if not self.peek_op("("):
                raise UnsupportedExpression("sqrt must be called with parentheses")
            return _power(self.parenthesised(), sympy.Rational(1, 2))
        if token.kind == "op" and token.text == "(":
            self.pos -= 1
            return self.parenthesised()
        raise UnsupportedExpression(f"unexpected token {token.text!r}")

    def function_call(self, name: str) -> sympy.Expr:
        """``f(expr)``, or ``f^k(expr)`` = ``f(expr)**k`` (parse_expr's function exponentiation)."""
        exponent = None
        if self.peek_op("**"):
            self.take()
            exponent = self.function_exponent()
        if not self.peek_op("("):
            raise UnsupportedExpression(f"{name} must be called with parentheses")
        value = _apply_function(name, self.parenthesised())
        return value if exponent is None else _power(value, exponent)

    def function_exponent(self) -> sympy.Expr:
        """What may stand between ``f^`` and ``(``: a signed number or symbol, or ``(expr)``."""
        if self.peek_op("-", "+"):
            sign = -1 if self.take().text == "-" else 1
            return sign * self.function_exponent()
        if self.peek_op("("):
            return self.parenthesised()
        token = self.take()
        if token.kind == "name":
            token = self.expand_name(token)
        if token.kind == "num":
            return _number(token.text)
        if token.kind == "symbol":
            return sympy.Symbol(token.text)
        raise UnsupportedExpression(f"unexpected function exponent {token.text!r}")

    def expand_name(self, token: _Token) -> _Token:
        """Replace a multi-letter name by its pieces; return the first piece.

        sympy applies "!" before splitting names, so ``xy!`` is ``factorial(x*y)``: in that
        case the pieces are multiplied into one number-or-product token instead.
        """
        pieces = _expand_name(token.text)
        if len(pieces) == 1:
            return pieces[0]
        if self.peek_op("!"):
            product = sympy.Mul(*(self.piece_value(piece) for piece in pieces))
            return _Token("value", "", product)
        self.tokens[self.pos : self.pos] = pieces[1:]
        return pieces[0]

    @staticmethod
    def piece_value(piece: _Token) -> sympy.Expr:
        return _number(piece.text) if piece.kind == "num" else sympy.Symbol(piece.text)

    def parenthesised(self) -> sympy.Expr:
        self.expect_op("(")
        inner = self.expr()
        self.expect_op(")")
        return inner


def parse_sympy_expression(text: str) -> sympy.Expr:
    """Parse a normalised answer (``^`` means power) into a sympy expression.

    Raises :class:`UnsupportedExpression` for anything outside the grammar or the bounds.
    """
    if len(text) > MAX_INPUT_CHARS:
        raise UnsupportedExpression("input too long")
    tokens = tokenize(text)
    if not tokens:
        raise UnsupportedExpression("empty input")
    try:
        expr = _Parser(tokens).parse()
        _check_exponentials(expr)  # products merge exponentials: exp(999)*exp(999) is exp(1998)
        functions = sum(isinstance(node, _FUNCTION_CLASSES) for node in sympy.preorder_traversal(expr))
        if functions > MAX_FUNCTIONS:
            raise UnsupportedExpression("too many functions")
        too_big = degree_bound(expr) > MAX_DEGREE
    except RecursionError as error:  # e.g. hundreds of nested parentheses
        raise UnsupportedExpression("expression nested too deeply") from error
    if too_big:
        raise UnsupportedExpression("expression degree too large")
    return expr
