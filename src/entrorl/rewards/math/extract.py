"""Stage 1 of the ``math`` reward: the final answer of a completion (:data:`ANSWER_EXTRACTORS`)."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from entrorl.rewards.math.brackets import _split_top_level, _wrapped
from entrorl.rewards.math.units import _strip_unit_tail

__all__ = [
    "ANSWER_EXTRACTORS", "Extractors", "extract_answer_phrase", "extract_answer_tag", "extract_boxed",
    "extract_final_answer", "extract_hashes", "extract_last_number", "find_final_answer", "normalize_answer",
    "prepare_reference", "select_extractors"
]


_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
_BRACE_RE = re.compile(r"\\[{}]|[{}]")
_BARE_BOX_TOKEN_RE = re.compile(r"[^\s$]+")


def _closing_braces(text: str) -> dict[int, int]:
    """The position of the ``}`` that closes each closed ``{`` of ``text``, found in one pass (escaped
    braces ``\\{`` and ``\\}`` are content, not braces)."""
    closing: dict[int, int] = {}
    open_braces: list[int] = []
    for m in _BRACE_RE.finditer(text):
        brace = m.group(0)
        if brace == "{":
            open_braces.append(m.start())
        elif brace == "}" and open_braces:
            closing[open_braces.pop()] = m.start()
    return closing


def extract_boxed(text: str) -> str | None:
    """Content of the last complete top-level ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces and boxes kept),
    or of ``\\boxed 5`` / ``\\boxed5`` / ``\\boxed\\pi`` (without a brace, what follows up to a space or ``$``); None
    when there is none (an unclosed last box falls back to the previous one).

    Time linear in ``len(text)``: the braces are matched once for the whole text."""
    closing: dict[int, int] | None = None
    found, covered_until = None, -1
    for m in _BOX_RE.finditer(text):
        if m.start() < covered_until:  # a box inside the previous complete box is part of its content
            continue
        j = m.end()
        while j < len(text) and text[j] == " ":
            j += 1
        if j < len(text) and text[j] == "{":
            if closing is None:
                closing = _closing_braces(text)
            end = closing.get(j)
            if end is not None:
                found, covered_until = text[j + 1 : end], end + 1
        elif j > m.end() or (j < len(text) and (text[j].isdigit() or text[j] in "-\\")):  # \boxed 5, \boxed5, \boxed\pi
            token = _BARE_BOX_TOKEN_RE.match(text, j)
            if token:
                found, covered_until = token.group(0), token.end()
    return found


_TAGS = {False: (re.compile(r"<answer>", re.IGNORECASE), re.compile(r"</answer>", re.IGNORECASE)),
         True: (re.compile(r"<answer>"), re.compile(r"</answer>"))}  # keyed by case_sensitive


def extract_answer_tag(text: str, *, case_sensitive: bool = False) -> str | None:
    """Content of the last ``<answer>...</answer>`` (``<ANSWER>`` too unless ``case_sensitive``), reading left to
    right: each opening tag pairs with the first closing tag after it (so ``<answer>a<answer>b</answer>`` gives
    ``a<answer>b``), as reasoning-gym's own ``extract_answer`` reads it. Time linear in ``len(text)``."""
    opening_re, closing_re = _TAGS[case_sensitive]
    found, position = None, 0
    while (opening := opening_re.search(text, position)) is not None:
        closing = closing_re.search(text, opening.end())
        if closing is None:
            break
        found, position = text[opening.end() : closing.start()], closing.end()
    return found


# "\s*(?:\*\*\s*)?" rather than "\s*(?:\*\*)?\s*": two adjacent "\s*" backtrack quadratically over long blanks
_PHRASE_RE = re.compile(r"(?:\banswer\b\s*(?:\*\*\s*)?(?:is\b|:|=)|答案\s*(?:是|为|:|：))\s*[:：]?", re.IGNORECASE)
_SENTENCE_END_RE = re.compile(r"\.(?=\s|$)|。")
# a clause after the answer: a conjunction, or ", and" / ", but" before a new subject (not a list's "2, 3, and 5")
# (each match starts where its blanks do, so that a long run of blanks is not rescanned from each of its characters)
_CLAUSE_RE = re.compile(
    r"(?<![\s,]),?\s+(?P<word>because|since|as|if|when|whenever|which|while|whereas|where|given|unless|although|though)\b"
    r"|,\s*(?:and|but|so|while)\s+(?:the|this|that|it|its|we|i|you|they|there|he|she|my|our|each|every|then)\b",
    re.IGNORECASE)
# a condition or a concession that may bring another answer with it ("5, although it could be 6", "24 if ...; otherwise 6")
_CONDITIONAL_WORDS = frozenset({"if", "when", "whenever", "unless", "although", "though", "whereas", "while"})
# ... another case, or another value offered: "otherwise 6", "4 otherwise", "could be 5", "or 7.2", "in which case it
# is 14" (each reach bounded, so that a long line is read once)
_NUMBER_WORDS = (r"(?:\d|\b(?:zero|one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|thirteen|fourteen"
                 r"|fifteen|sixteen|seventeen|eighteen|nineteen|twenty)\b)")
_ALTERNATIVE_RE = re.compile(
    r"\b(?:if|when|whenever)\b"
    r"|\botherwise\b(?!\s+(?:noted|stated|specified|indicated|mentioned))"
    rf"|\b(?:could|might|may|would)\s+(?:\w+\s+){{0,2}}(?:be|say)\s+[^.;]{{0,40}}?{_NUMBER_WORDS}"
    r"|\bor\s+(?:(?:\\?\$|\\\()\s*)?-?(?:\d|\\frac|[A-Za-z]\s*=)"  # a value, not "one or two steps"
    rf"|\b(?:alternatively|in\s+which\s+case)\b[^.;]{{0,40}}?{_NUMBER_WORDS}",
    re.IGNORECASE)
_LONE_SYMBOL_RE = re.compile(r"\$?\s*[A-Za-z]\s*\$?\s*,?")


def _clause_start(line: str) -> int | None:
    """Where a clause after the answer begins in ``line`` (None: nowhere), outside math and braces ("$f(x) = x
    \\text{ if } x > 0$" is one answer); not at a condition or concession followed by another case or answer ("3 if n is
    odd and 4 if n is even", "5, although it could be 6": the whole line, which no single value matches), nor at a
    "where" that defines the symbol before it ("x where x = 3"). One pass over the line."""
    dollars = opened_math = closed_math = opened = closed = 0
    counted = 0
    for found in _CLAUSE_RE.finditer(line):
        dollars += len(_UNESCAPED_DOLLAR_RE.findall(line, counted, found.start()))
        segment = line[counted : found.start()]
        opened_math, closed_math = opened_math + segment.count("\\("), closed_math + segment.count("\\)")
        opened, closed = opened + segment.count("{"), closed + segment.count("}")
        counted = found.start()
        if dollars % 2 or opened_math > closed_math or opened > closed:
            continue
        word = (found["word"] or "").lower()
        if word in _CONDITIONAL_WORDS and _ALTERNATIVE_RE.search(line, found.end()):
            return None
        if word == "where" and _LONE_SYMBOL_RE.fullmatch(line[: found.start()].strip()):
            return None
        return found.start()
    return None


# "the answer is therefore 42": words between the phrase and the answer
_PHRASE_FILLER_RE = re.compile(r"^(?:(?:therefore|thus|hence|so|then|simply|clearly|just|indeed|finally|obviously)\b[\s,]*)+(?=\S)",
                               re.IGNORECASE)


def extract_answer_phrase(text: str) -> str | None:
    """What follows the last "answer is" / "answer:" / "answer =" (also "Final answer:", "答案是"), up to
    the end of the line (or of a display-math block starting there) or the first sentence-ending period."""
    last = None
    for last in _PHRASE_RE.finditer(text):
        pass
    if last is None:
        return None
    rest = _PHRASE_FILLER_RE.sub("", text[last.end() :].lstrip(" \t*\n"))
    for opener, closer in (("$$", "$$"), ("\\[", "\\]")):
        if rest.startswith(opener):
            end = rest.find(closer, len(opener))
            if end != -1:
                return rest[len(opener) : end]
    line = rest.split("\n", 1)[0]
    m = _SENTENCE_END_RE.search(line)
    if m:
        line = line[: m.start()]
    clause = _clause_start(line)  # "11 because 3*4 = 12", "7, and the wrong one is 8": the answer is what precedes
    if clause is not None:
        line = line[:clause]
    return line.strip(" \t*")


_HASHES_RE = re.compile(r"####\s*([^\n]*)")


def extract_hashes(text: str) -> str | None:
    """GSM8K style: what follows the last ``####``."""
    matches = _HASHES_RE.findall(text)
    return matches[-1].strip(" \t*_") if matches else None  # "**#### 72**": markdown's emphasis, not the answer's


# not after a letter, digit, "_" or "." (a variable's index, a longer number), but after Chinese, Japanese or Korean
# text ("共计12元"), whose characters are letters too
_CJK = "\u3040-\u30ff\u3400-\u9fff\uac00-\ud7af\uf900-\ufaff"
_NUMBER_START = rf"(?<![^\W{_CJK}])(?<!\.)"
_NUMBER_RE = re.compile(
    rf"{_NUMBER_START}-?(?P<whole>\d{{1,3}}) (?P<numerator>\d+)/(?P<denominator>\d+)(?![\d/]|\.\d)"  # a mixed number: 2 1/2
    rf"|{_NUMBER_START}-?(?:\d{{1,3}}(?:,\d{{3}})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?(?![\d])"
    rf"|{_NUMBER_START}-?\.\d+"
)
_SUPERSCRIPT_DIGITS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹", "0123456789")
_SUPERSCRIPT_RE = re.compile("[⁰¹²³⁴⁵⁶⁷⁸⁹]+")
_UNIT_SUPERSCRIPT_RE = re.compile("(?<=[A-Za-z])[⁰¹²³⁴⁵⁶⁷⁸⁹]+")  # after a letter, in running text: a unit's (m², cm³)


def superscripts_as_powers(text: str, *, braced: bool = True) -> str:
    """``text`` with each run of superscript digits written as a power: ``5²`` is ``5^{2}`` (``5^2`` unbraced)."""
    opening, closing = ("^{", "}") if braced else ("^", "")
    return _SUPERSCRIPT_RE.sub(lambda found: opening + found.group().translate(_SUPERSCRIPT_DIGITS) + closing, text)


# $..$, $$..$$, \(..\), \[..\]; an escaped \$ is a dollar sign, not a delimiter
_MATH_DELIMITER_RE = re.compile(r"\$\$|\\\[|\\\]|\\\(|\\\)|(?<!\\)\$")
_MATH_CLOSERS = {"$$": "$$", "\\[": "\\]", "\\(": "\\)", "$": "$"}
# what separates the sides of a statement in a math span: the number's own side is its value
_RELATION_RE = re.compile(
    r":=|=|≈|≤|≥|≡|<|>|⇒|→|∴|\\(?:approx|approxeq|simeq|leq?|geq?|leqslant|geqslant|neq?|in|equiv|sim|to|therefore"
    r"|because|Rightarrow|implies|Longrightarrow|rightarrow|longrightarrow|iff|coloneqq)(?![A-Za-z])"
)
# what surrounds a value in a math span without changing it: words (each left as a space) ...
_WORDS_RE = re.compile(
    r"\(\s*\\text\s*\{[^{}]*\}\s*\)"
    r"|\\(?:text|textit|textrm|textnormal|textsf|texttt|mathrm|mathit|mathsf|operatorname|mbox)\s*\{[^{}]*\}"
)
# ... and spacing, end-of-proof marks, layout and dollar signs (each left out: "1\,000" is 1000)
_LAYOUT_RE = re.compile(
    r"\\(?:quad|qquad|blacksquare|square|Box|qed|checkmark|displaystyle|ldots|dots)(?![A-Za-z])|\\[,;:! ]|~"
    r"|\\(?:begin|end)\s*\{[^{}]*\}(?:\s*\{[^{}]*\})?|\\\\|&|\\\$"
)
_EMPHASIS_RE = re.compile(r"\\(?:mathbf|boldsymbol|bm|textbf|underline|boxed)\s*\{([^{}]*)\}")  # the content stays
# after a number, marks that make it an ordinal or an angle, not part of a power: 7^{th}, 30^\circ, 30°
_NUMBER_MARK_RE = re.compile(
    r"(?<=\d)\s*(?:\^\s*\{?\s*(?:\\text\s*\{\s*)?(?:st|nd|rd|th)\b\s*\}?\s*\}?|\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![A-Za-z]))"
)
# two words of prose in a row, outside \text: what a pair of currency signs ("$5 ... 5.5$") enclosed, not math
_PROSE_RE = re.compile(r"(?<![\\A-Za-z])[A-Za-z]{2,}\s+[A-Za-z]{2,}(?![A-Za-z])")
_PLAIN_NUMBER = r"(?:\d{1,3}(?:(?:,|\{,\})\d{3})+|\d+)(?:\.\d+)?|\.\d+"  # an alternation: group it where it is used
_IRRATIONAL = r"\\sqrt\s*\{\s*(?:" + _PLAIN_NUMBER + r")\s*\}|\\sqrt\s*\d|\\pi(?![A-Za-z])"
_ROOT_OR_PI = rf"(?:{_PLAIN_NUMBER})?\s*(?:{_IRRATIONAL})"
_TERM = rf"(?:{_ROOT_OR_PI}|{_PLAIN_NUMBER})"
_SUM = rf"[-+]?\s*{_TERM}(?:\s*[-+]\s*{_TERM})*"  # 1 + \sqrt{5}
_SCALAR = (
    rf"(?:\\pm\s*|[-+]\s*)?(?:\\[dt]?frac\s*\{{\s*{_SUM}\s*\}}\s*\{{\s*{_SUM}\s*\}}|\\[dt]?frac\s*\d\s*\d"
    rf"|(?:\d+\s*)?\\[dt]?frac\s*\{{\s*\d+\s*\}}\s*\{{\s*\d+\s*\}}"  # a mixed number: 3 \frac{1}{2}
    rf"|(?:{_PLAIN_NUMBER})\s*(?:\\times|\\cdot)\s*10\s*\^\s*\{{?\s*-?\d+\s*\}}?"  # 3 \times 10^{8}
    rf"|{_TERM}(?:\s*/\s*{_TERM})?"
    rf"|{_TERM}(?:\s*[-+]\s*{_TERM})+)"  # 3 + 2\sqrt{2}; a sum of plain numbers (3 + 4) is refused by _is_written_value
)
_PLAIN_SUM_RE = re.compile(rf"[-+]?\s*(?:{_PLAIN_NUMBER})(?:\s*[-+]\s*(?:{_PLAIN_NUMBER}))+\s*(?:\\?%)?")
# a value written out, not an expression to evaluate: 7, -3.5, 1{,}000, 3/4, \frac{3}{2}, 2\sqrt{3}, 4\pi, \pm 5, 20%
_VALUE_RE = re.compile(rf"(?:{_SCALAR})\s*(?:\\?%)?")
_LIST_BRACKETS = (("\\{", "\\}"), ("(", ")"), ("[", "]"), ("(", "]"), ("[", ")"))
_UNIT_POWER_RE = re.compile(r"\^\s*\{?\s*[23]\s*\}?")
_ATTACHED = frozenset("^_")  # a number written against these is part of a power or an index, not a value of its own


def _is_dollar_delimiter(text: str, index: int, opening: bool) -> bool:
    """Pandoc's rule for a single ``$``: an opening one has a non-space after it, a closing one a non-space before it
    and no digit after it; and an opening one follows no digit, so that ``5$ and 2$`` (currency) opens nothing."""
    before = text[index - 1] if index else " "
    after = text[index + 1] if index + 1 < len(text) else " "
    if opening:
        return not after.isspace() and not before.isdigit()
    return not before.isspace() and not after.isdigit()


def _math_span_around(text: str, position: int) -> tuple[int, int] | None:
    """The bounds of the content of the math span (``$..$``, ``$$..$$``, ``\\(..\\)``, ``\\[..\\]``) that holds
    ``position``, or None. One pass over the delimiters: time linear in ``len(text)``."""
    opener, start = None, 0
    for delimiter in _MATH_DELIMITER_RE.finditer(text):
        token = delimiter.group()
        if opener is None:
            if delimiter.start() > position:
                return None
            if token in _MATH_CLOSERS and (token != "$" or _is_dollar_delimiter(text, delimiter.start(), opening=True)):
                opener, start = token, delimiter.end()
        elif token == _MATH_CLOSERS[opener] and (token != "$" or _is_dollar_delimiter(text, delimiter.start(), opening=False)):
            if start <= position < delimiter.start():
                return start, delimiter.start()
            opener = None
        elif token == "$" == opener and _is_dollar_delimiter(text, delimiter.start(), opening=True):
            start = delimiter.end()  # "$15 and has $7.50$": the first was a dollar sign; math starts here
    return None


def _value_around(content: str, start: int, end: int) -> str | None:
    """The side of the statement ``content`` (a math span) that holds ``content[start:end]``, without its
    decorations, if that side is a value written out (:data:`_VALUE_RE`); None if it is an expression."""
    relations = list(_RELATION_RE.finditer(content))
    left = max((m.end() for m in relations if m.end() <= start), default=0)
    right = min((m.start() for m in relations if m.start() >= end), default=len(content))
    side, previous = content[left:right], None
    while side != previous:  # "(\text{...})" and "\quad" may each uncover the other
        side, previous = _LAYOUT_RE.sub("", _WORDS_RE.sub(" ", side)), side
    side = _EMPHASIS_RE.sub(r"\1", side).strip(" \t\n:,;").rstrip(".").strip()
    power = side.rfind("^")  # the power of a unit whose name was words: "125 \text{ cm}^3" became "125 ^3"
    if power > 0 and side[power - 1].isspace() and _UNIT_POWER_RE.fullmatch(side, power):
        side = side[:power].rstrip()
    side = _strip_unit_tail(side)  # "12 cm", "60 km/h"
    one_element = _wrapped(side, "\\{", "\\}")  # x \in \{7\}
    if one_element is not None and _VALUE_RE.fullmatch(one_element.strip()):
        side = one_element.strip()
    return side if _is_written_value(side) else None


def _is_written_value(side: str) -> bool:
    """Whether ``side`` is a value written out (:data:`_VALUE_RE`) or a list, tuple, interval or set of them
    (``2, 3, 5``, ``(2, -3)``, ``[2, 5)``, ``\\{1, 2\\}``); each item is matched on its own, so no pattern backtracks
    over the whole list."""
    if _VALUE_RE.fullmatch(side):
        return not _PLAIN_SUM_RE.fullmatch(side)  # arithmetic to do, not its result
    inner = next((inside for opener, closer in _LIST_BRACKETS if (inside := _wrapped(side, opener, closer))), side)
    items = _split_top_level(inner)
    return len(items) > 1 and all(_VALUE_RE.fullmatch(item) and not _PLAIN_SUM_RE.fullmatch(item) for item in items)


def extract_last_number(text: str) -> str | None:
    """The last number in the text (``-3``, ``2.5``, ``1,234``, ``3/4``, ``.5``, ``1e3``), commas and a percent sign
    after it dropped (GSM8K-style references are numbers of percent) — unless it is part of an expression, so that the
    digits of one do not pass for the answer (``2`` is not the answer of ``$\\frac{3}{2}$``, ``$\\sqrt{2}$``,
    ``$2^{10}$`` or ``2^10``, and a restated ``$\\gcd(12, 18)$`` answers nothing):

    * inside a math span, the value on the number's side of the statement (``=``, ``\\approx``, ``\\le``, ...), words,
      spacing and end marks left out, when that side is a value written out (``$x = \\frac{3}{2}$`` gives
      ``\\frac{3}{2}``, ``$4\\pi$`` gives ``4\\pi``, ``$\\text{Total: } 7 \\text{ apples}$`` gives ``7``); None when it is
      an expression;
    * elsewhere, None for a number written against ``^`` or ``_`` (ordinals such as ``7^{th}`` are plain numbers).
    """
    text = _NUMBER_MARK_RE.sub("", superscripts_as_powers(
        _UNIT_SUPERSCRIPT_RE.sub("", text.replace("\u2212", "-")), braced=False))
    last = None
    for last in _NUMBER_RE.finditer(text):
        pass
    if last is None:
        return None
    span = _math_span_around(text, last.start())
    if span is not None and _PROSE_RE.search(_WORDS_RE.sub(" ", text[span[0] : span[1]])):
        span = None  # "$5 and the total is 5.5$": two currency signs, not math
    if span is not None:
        value = _value_around(text[span[0] : span[1]], last.start() - span[0], last.end() - span[0])
        return None if value is None else _without_percent_sign(value)
    before = text[last.start() - 1] if last.start() else ""
    after = text[last.end()] if last.end() < len(text) else ""
    if before in _ATTACHED or after in _ATTACHED:
        return None
    if last.group("whole") is not None:
        whole, numerator, denominator = (int(last.group(part)) for part in ("whole", "numerator", "denominator"))
        if 0 < numerator < denominator:  # a proper fraction after a whole number: one mixed number
            sign = "-" if last.group().startswith("-") else ""
            return f"{sign}{whole}\\frac{{{numerator}}}{{{denominator}}}"
        return f"{numerator}/{denominator}"  # "3 7/2": two numbers, the last one a fraction
    return re.sub(r"\s+", "", last.group()).replace(",", "")


def _without_percent_sign(value: str) -> str:
    """``value`` without a ``%`` / ``\\%`` at its end (a string operation: no regular expression to backtrack)."""
    if value.endswith("%"):
        value = value[:-1].removesuffix("\\").rstrip()
    return value


#: ``(name, extractor)`` pairs tried in order by :func:`extract_final_answer`.
ANSWER_EXTRACTORS: list[tuple[str, Callable[[str], str | None]]] = [
    ("boxed", extract_boxed),
    ("answer_tag", extract_answer_tag),
    ("answer_phrase", extract_answer_phrase),
    ("hashes", extract_hashes),
    ("last_number", extract_last_number),
]

_UNESCAPED_DOLLAR_RE = re.compile(r"(?<!\\)\$")
_WRAPPERS = (("$$", "$$"), ("\\[", "\\]"), ("\\(", "\\)"), ("$", "$"), ("**", "**"), ("`", "`"))


def _stripped_bounds(text: str, start: int, end: int) -> tuple[int, int]:
    """``(start, end)`` narrowed past the whitespace at both ends of ``text[start:end]``."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def normalize_answer(answer: str) -> str:
    """Strip whitespace, enclosing ``$..$`` / ``\\(..\\)`` / ``\\[..\\]`` / ``**..**`` and a trailing period
    (repeatedly; time linear in ``len(answer)``, as only the bounds move until the end)."""
    start, end = _stripped_bounds(answer, 0, len(answer))
    changed = True
    while changed and start < end:
        changed = False
        for opener, closer in _WRAPPERS:
            inner_start, inner_end = start + len(opener), end - len(closer)
            wrapped = answer.startswith(opener, start, end) and answer.endswith(closer, start, end)
            if inner_start <= inner_end and wrapped:
                if opener.startswith("$") and _UNESCAPED_DOLLAR_RE.search(answer, inner_start, inner_end):
                    continue  # "$a$ and $b$" is not one wrapped block; "$\$12$" is
                start, end = _stripped_bounds(answer, inner_start, inner_end)
                changed = True
        if end > start and answer[end - 1] == ".":
            start, end = _stripped_bounds(answer, start, end - 1)
            changed = True
    return answer[start:end]


Extractors = Sequence[tuple[str, Callable[[str], str | None]]]


def find_final_answer(text: str, extractors: Extractors | None = None) -> tuple[str, str] | None:
    """``(extractor name, normalized answer)`` from the first extractor (in order; default
    :data:`ANSWER_EXTRACTORS`) that finds a non-empty answer in ``text``; None if none does. After a reasoning block
    closed by ``</think>`` (a guess while thinking is not the answer): the extractors but ``last_number`` on the text
    after the last ``</think>``, then ``boxed`` and ``answer_tag`` on the whole text, then the block's stated answer
    (``answer_phrase``, ``hashes``) when the text after it repeats that number, then ``last_number`` after the block,
    then every extractor on the whole text (the last ``</think>`` read as a line break)."""
    if not isinstance(text, str) or not text.strip():
        return None
    extractors = list(extractors if extractors is not None else ANSWER_EXTRACTORS)
    closed = text.rfind("</think>")
    if closed != -1:  # a stated answer after the block, a marked one anywhere, a loose number after the block
        after = text[closed + len("</think>"):]
        for where, chosen in ((after, [pair for pair in extractors if pair[0] != "last_number"]),
                              (text, [pair for pair in extractors if pair[0] in ("boxed", "answer_tag")])):
            found = _first_answer(where, chosen)
            if found is not None:
                return found
        # the block's stated answer, when the text after it restates it ("The total is 42 (6 boxes x 7 apples)")
        stated = _first_answer(text[:closed], [pair for pair in extractors if pair[0] in ("answer_phrase", "hashes")])
        if stated is not None and _restates(after, stated[1]):
            return stated
        found = _first_answer(after, [pair for pair in extractors if pair[0] == "last_number"])
        if found is not None:
            return found
        # the whole text, the tag a line break: a phrase running to its line's end does not take the tag with it
        text = text[:closed] + "\n" + after
    return _first_answer(text, extractors)


def _restates(text: str, answer: str) -> bool:
    """Whether the first sentence of ``text`` (up to a clause such as "because ...") starts its numbers with ``answer``'s
    value and keeps every later one in brackets (an explanation: "42 (6 boxes x 7 apples)"; not "After 10 minutes the
    tank holds 35 liters")."""
    sentence = text.strip().split("\n", 1)[0]
    for end in (_SENTENCE_END_RE.search(sentence), _CLAUSE_RE.search(sentence)):
        if end is not None:
            sentence = sentence[: end.start()]
    depth = position = 0
    first = None
    for found in _NUMBER_RE.finditer(sentence):
        segment = sentence[position : found.start()]
        depth = depth + segment.count("(") + segment.count("[") - segment.count(")") - segment.count("]")
        position = found.start()
        if first is None:
            first = _number_value(found.group())
            if first != _number_value(answer):
                return False
        elif depth <= 0:
            return False
    return first is not None


def _number_value(written: str) -> str:
    """A number as its digits: without blanks, thousands' commas and dollar signs (``$5,000`` is ``5000``)."""
    return re.sub(r"\s+|,|\\?\$", "", written)


def _first_answer(text: str, extractors: Extractors) -> tuple[str, str] | None:
    for name, extractor in extractors:
        found = extractor(text)
        if found is not None:
            found = normalize_answer(found)
            if found:
                return name, found
    return None


def extract_final_answer(text: str, extractors: Extractors | None = None) -> str | None:
    """The completion's final answer (normalized), by the first extractor that finds a non-empty one;
    None if none does."""
    found = find_final_answer(text, extractors)
    return found[1] if found is not None else None


def select_extractors(names: Sequence[str]) -> list[tuple[str, Callable[[str], str | None]]]:
    """The ``(name, extractor)`` pairs of :data:`ANSWER_EXTRACTORS` named in ``names``, in the order
    given; ValueError for an unknown name, a repeated one or an empty list."""
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise ValueError(f"extractors must be a list of extractor names, got {names!r}")
    known = dict(ANSWER_EXTRACTORS)
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown answer extractor(s) {unknown}; known: {list(known)}")
    if not names or len(set(names)) != len(names):
        raise ValueError(f"extractors must name each extractor at most once and at least one, got {list(names)}")
    return [(name, known[name]) for name in names]


def prepare_reference(reference: str) -> str:
    """A reference answer ready for comparison, normalized: the content of its last ``\\boxed{}`` if it has one,
    else what follows its last ``####`` (GSM8K's answer column: a worked solution, then ``#### 72``), else the whole
    text."""
    answer = extract_boxed(reference)
    if answer is None:
        answer = extract_hashes(reference)
    return normalize_answer(answer if answer is not None else reference)  # an empty box or #### gives no reference
