"""The ``math`` reward judges equivalence, not spelling, and says why a completion scored 0.

The table below is the documented contract: each row is (question, completion, reference, expected
score, expected reason substring). Rows scoring 1.0 must carry no reason; rows scoring 0.0 must carry a
reason containing the substring. The rules themselves are described in ``entrorl.rewards.math`` and
``docs/rewards.md``.
"""

from __future__ import annotations

import json
import pickle
import re
import signal
import sys
import threading
import time

import pytest
import torch

import entrorl.rewards.math.compare as math_compare
from entrorl.rewards import RewardResult, RewardRunner, get_reward
from entrorl.rewards.math import (
    ANSWER_EXTRACTORS,
    JudgeTimeout,
    MathOptions,
    MathReward,
    MathVerdict,
    QuestionHints,
    canonical_answer,
    compare_answers,
    extract_answer_tag,
    extract_boxed,
    find_final_answer,
    math_equal,
    normalize_answer,
    read_question,
    select_extractors,
)

PERCENT_QUESTION = "The shop bought the goods for 50 yuan and sold them for 98 yuan. Profit: __%?"
REAL_ROOTS_QUESTION = "Find all real roots of x^7 - 6x^6 + ... = 0."
SEVENTH_DEGREE_QUESTION = "Solve the equation x^7 - 6x^6 + 13x^5 - ... = 0."
COMPLEX_ROOTS_QUESTION = "Find all complex roots of p(x) = 0."
ROUNDING_QUESTION = "What is the area of a unit circle? Round to two decimal places."

# (question, completion, reference, expected score, expected reason substring or "" for a score of 1)
CASES = [
    # -- extraction ---------------------------------------------------------------------------
    ("", r"So $x = \boxed{\frac{1}{2}}$.", "0.5", 1.0, ""),
    ("", r"\boxed{\frac{1}{\frac{1}{2}}}", "2", 1.0, ""),
    ("", r"\fbox{7}", "7", 1.0, ""),
    ("", r"first \boxed{3}, on reflection \boxed{4}", "4", 1.0, ""),
    ("", r"first \boxed{3}, on reflection \boxed{4}", "3", 0.0, "answer 4 differs from reference 3"),
    ("", "We add them. The answer is 12.", "12", 1.0, ""),
    ("", "Final answer: 3.5", "7/2", 1.0, ""),
    ("", "答案是 42", "42", 1.0, ""),
    ("", "I computed 17, then 18", "18", 1.0, ""),
    ("", "The answer is 5. Wait, I made an error. The answer is 6.", "6", 1.0, ""),
    ("", r"\boxed{} so the answer is 7", "7", 1.0, ""),
    ("", "no digits, no box, nothing", "5", 0.0, "no final answer found"),
    ("", "", "5", 0.0, "no final answer found"),
    ("", r"\boxed{12}", "13", 0.0, "answer 12 differs from reference 13"),
    ("", r"\boxed{@#$%^&}", "5", 0.0, "could not parse answer"),
    ("", r"So \boxed5", "5", 1.0, ""),  # a box without braces takes the next token, as LaTeX does
    ("", r"so it is \boxed\frac12", "1/2", 1.0, ""),
    ("", r"so it is \boxed\pi", r"\pi", 1.0, ""),
    # -- fractions, decimals, LaTeX vs plain text ---------------------------------------------
    ("", r"\boxed{\dfrac{2}{3}}", "2/3", 1.0, ""),
    ("", r"\boxed{\tfrac12}", "0.5", 1.0, ""),
    ("", r"\boxed{-\frac{3}{4}}", "-0.75", 1.0, ""),
    ("", r"\boxed{\left(\frac{1}{2}\right)}", "1/2", 1.0, ""),
    ("", r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt3}{2}", 1.0, ""),
    ("", r"\boxed{(x+1)^2}", "x^2+2x+1", 1.0, ""),
    ("", r"\boxed{x^2+2x}", "(x+1)^2", 0.0, "differs from reference"),
    ("", r"\boxed{-7}", "7", 0.0, "answer -7 differs from reference 7"),
    ("", r"\boxed{0.25}", r"\frac{1}{3}", 0.0, "differs from reference"),
    # -- thousands separators -----------------------------------------------------------------
    ("", r"\boxed{1,000}", "1000", 1.0, ""),
    ("", r"\boxed{1{,}000}", "1000", 1.0, ""),
    ("", r"\boxed{1\,000}", "1000", 1.0, ""),
    ("", r"\boxed{12,345,678}", "12345678", 1.0, ""),
    ("", r"\boxed{1000}", "1,000,000", 0.0, "answer 1000 differs from reference 1,000,000"),
    # -- exact integers are compared exactly, however large ---------------------------------------
    ("", r"\boxed{99999999999}", "100000000000", 0.0, "answer 99999999999 differs from reference 100000000000"),
    ("", r"\boxed{10^{12}+1}", "10^{12}", 0.0, "differs from reference"),
    ("", r"\boxed{10^{12}}", "1000000000000", 1.0, ""),
    # -- percentages (the seeds' "profit __%" with reference 96) -------------------------------
    (PERCENT_QUESTION, r"The profit is \boxed{96\%}", "96", 1.0, ""),
    (PERCENT_QUESTION, r"\boxed{96}", "96", 1.0, ""),
    (PERCENT_QUESTION, "The answer is 96 percent.", "96", 1.0, ""),
    (PERCENT_QUESTION, r"\boxed{0.96}", "96", 0.0, "the question asks for a percentage"),
    ("What percentage of the students passed?", r"\boxed{25\%}", "25", 1.0, ""),
    ("What percentage of the students passed?", r"\boxed{24}", "25", 0.0, "answer 24 differs from reference 25"),
    ("What fraction of the pie is left?", r"\boxed{25\%}", "0.25", 1.0, ""),
    ("What fraction of the pie is left?", r"\boxed{25\%}", "1/4", 1.0, ""),
    ("How many apples are left?", r"\boxed{96\%}", "96", 0.0, "a percent sign means /100"),
    ("A 20% discount applies. What fraction of the price is paid?", r"\boxed{80\%}", "0.8", 1.0, ""),
    ("", r"\boxed{0.96}", r"96\%", 1.0, ""),
    # a question asking for a percentage reads a reference "96%" as 96 percent only: 0.96 is 0.96 %
    (PERCENT_QUESTION, r"\boxed{0.96}", r"96\%", 0.0, "the question asks for a percentage"),
    (PERCENT_QUESTION, r"\boxed{\frac{1}{2}\%}", "0.5", 1.0, ""),  # a sign after a fraction is a unit too
    ("", r"\boxed{96}", r"96\%", 1.0, ""),
    ("", r"\boxed{0.96\%}", r"96\%", 0.0, "differs from reference"),
    # -- constants against decimal approximations ----------------------------------------------
    ("", r"\boxed{\pi}", "3.14", 1.0, ""),
    ("", "The answer is 圆周率", "3.14", 1.0, ""),
    ("", "The answer is pi", "3.14", 1.0, ""),
    ("", r"\boxed{3.1415926}", r"\pi", 1.0, ""),
    ("", r"\boxed{3.1416}", r"\pi", 1.0, ""),
    ("", r"\boxed{3.1415}", r"\pi", 1.0, ""),  # cut to the written digits ...
    ("", r"\boxed{-3.1415}", r"\pi", 0.0, r"answer -3.1415 differs from reference \pi"),  # ... with pi's sign
    ("", r"\boxed{3.15}", r"\pi", 0.0, r"answer 3.15 differs from reference \pi"),
    ("", r"\boxed{3}", r"\pi", 0.0, "differs from reference"),
    ("Round to the nearest integer.", r"\boxed{3}", r"\pi", 1.0, ""),
    (ROUNDING_QUESTION, r"\boxed{3.1415926}", "3.14", 1.0, ""),
    ("", r"\boxed{3.1415926}", "3.14", 0.0, "answer 3.1415926 differs from reference 3.14"),
    ("", r"\boxed{2.718}", "e", 1.0, ""),
    ("", r"\boxed{2.72}", "e", 1.0, ""),
    ("", r"\boxed{2.73}", "e", 0.0, "differs from reference e"),
    ("", r"\boxed{1.414}", r"\sqrt{2}", 1.0, ""),
    ("", r"\boxed{0.6667}", r"\frac{2}{3}", 1.0, ""),
    ("", r"\boxed{0.67}", r"\frac{2}{3}", 0.0, "differs from reference"),
    ("Give the answer to two decimal places.", r"\boxed{0.67}", r"\frac{2}{3}", 1.0, ""),
    ("", r"\boxed{1012}", r"\frac{2023}{2}", 0.0, "differs from reference"),  # an integer is no approximation
    ("Round to the nearest integer.", r"\boxed{1012}", r"\frac{2023}{2}", 1.0, ""),
    # -- units, currency, degrees -------------------------------------------------------------
    ("", r"\boxed{5 cm}", "5", 1.0, ""),
    ("", r"\boxed{5\text{ cm}}", "5", 1.0, ""),
    ("", r"\boxed{5\ \text{cm}^2}", "5", 1.0, ""),
    ("", r"\boxed{12 km/h}", "12", 1.0, ""),
    ("", r"\boxed{\$5}", "5", 1.0, ""),
    ("", r"\boxed{-\$5}", "-5", 1.0, ""),
    ("", r"\boxed{\$1,250}", "1250", 1.0, ""),
    ("", r"\boxed{30^\circ}", "30", 1.0, ""),
    ("", r"\boxed{30^{\circ}}", "30", 1.0, ""),
    ("", r"\boxed{30°}", "30", 1.0, ""),
    ("", r"\boxed{30°C, 40°C}", "30, 40", 1.0, ""),  # degrees Celsius in a list
    ("", r"\boxed{€5}", "5", 1.0, ""),
    ("", r"\boxed{6 cm}", "5", 0.0, "answer 6 cm differs from reference 5"),
    ("", r"\boxed{2x}", "2", 0.0, "differs from reference 2"),  # x is a variable, not a unit
    ("", r"\boxed{\frac{\pi}{2}}", r"90^\circ", 0.0, "differs from reference"),  # no unit conversion
    # -- intervals ----------------------------------------------------------------------------
    ("", r"\boxed{[1,2)}", "[1, 2)", 1.0, ""),
    ("", r"\boxed{\left[1, 2\right)}", "[1,2)", 1.0, ""),
    ("", r"\boxed{\bigl(1, 2\bigr)}", "(1, 2)", 1.0, ""),
    ("", r"\boxed{(-\infty, 3]}", "(-inf, 3]", 1.0, ""),
    ("", r"\boxed{[1,2]}", "[1,2)", 0.0, "answer [1,2] differs from reference [1,2)"),
    ("", r"\boxed{(1,2)}", "[1,2)", 0.0, "differs from reference"),
    ("", r"\boxed{(2,1)}", "(1,2)", 0.0, "differs from reference"),  # a point: order matters
    # -- sets and lists of roots in any order ----------------------------------------------------
    ("", r"\boxed{x=1, x=-2}", "-2, 1", 1.0, ""),
    ("", r"\boxed{x = 1 \text{ or } x = -2}", "-2,1", 1.0, ""),
    ("", r"\boxed{3.14 or 2.72}", r"\pi, e", 1.0, ""),  # a plain "or" separates a list of approximations
    ("", r"\boxed{\{2, 1\}}", r"\{1, 2\}", 1.0, ""),
    ("", r"The roots are \boxed{1, 2, 3}", "3,1,2", 1.0, ""),
    ("", r"\boxed{-1 \pm \sqrt{2}}", r"-1-\sqrt2, -1+\sqrt2", 1.0, ""),
    ("", r"\boxed{1, 1, 2}", "2, 1", 1.0, ""),  # a repeated root is one value
    ("", r"\boxed{3 \pm 1}", "4", 0.0, "the answer has 2 distinct value(s), the reference 1"),
    ("", r"\boxed{x=1, x=-2}", "1, 2", 0.0, "reference value 2 is not in the answer"),
    ("", r"\boxed{1, 2}", "3,1,2", 0.0, "the answer has 2 distinct value(s), the reference 3"),
    ("", r"\boxed{\{1,2,3\}}", r"\{1,2\}", 0.0, "the answer has 3 distinct value(s), the reference 2"),
    # -- several variables: matched name to value; an unnamed list by position ----------------------
    ("", r"\boxed{y=3, x=2}", "x=2, y=3", 1.0, ""),
    ("", r"\boxed{x=3, y=2}", "x=2, y=3", 0.0, "reference value x = 2 is not in the answer"),
    ("", r"\boxed{2, 3}", "x=2, y=3", 1.0, ""),
    ("", r"\boxed{3, 2}", "x=2, y=3", 0.0, "reference value x = 2 is not in the answer"),
    ("", r"\boxed{2; 3}", "x=2, y=3", 1.0, ""),
    # -- real roots vs complex roots (the seeds' degree-7 equation) -------------------------------
    (SEVENTH_DEGREE_QUESTION, r"\boxed{1, 2, 3, i, -i, 1+i, 1-i}", "1, 2, 3", 1.0, ""),
    (REAL_ROOTS_QUESTION, r"\boxed{1, 2, 3}", "1, 2, 3, i, -i, 1+i, 1-i", 1.0, ""),
    (REAL_ROOTS_QUESTION, r"\boxed{1, 2, 3, i, -i, 1+i, 1-i}", "1, 2, 3", 1.0, ""),
    (REAL_ROOTS_QUESTION, r"\boxed{1, 2}", "1, 2, 3, i, -i", 0.0, "the answer has 2 distinct value(s)"),
    (COMPLEX_ROOTS_QUESTION, r"\boxed{1, 2, 3}", "1, 2, 3, i, -i, 1+i, 1-i", 0.0, "the reference 7"),
    (COMPLEX_ROOTS_QUESTION, r"\boxed{i, -i, 1}", "1, -i, i", 1.0, ""),
    ("", r"\boxed{1, 2}", "1, 2, i, -i", 0.0, "the answer has 2 distinct value(s), the reference 4"),
    ("", r"\boxed{\frac{-1 + \sqrt{3}i}{2}, \frac{-1 - \sqrt{3}i}{2}}", r"-\frac12 \pm \frac{\sqrt3}{2}i", 1.0, ""),
    # a value computed through complex numbers whose imaginary part is rounding noise is real
    ("", r"\boxed{\frac{1}{1+i}+\frac{1}{1-i}, 2}", "1, 2", 1.0, ""),
    # a reference without real roots is matched by no answer, not by any answer without real roots
    (REAL_ROOTS_QUESTION, r"\boxed{5i}", "i, -i", 0.0, r"answer 5i differs from reference i, -i"),
    # -- a set is neither a pair nor an interval, whichever order it is written in -----------------
    ("", r"\boxed{\{1,2\}}", "(1,2)", 0.0, "a set is neither an ordered pair nor an interval"),
    ("", r"\boxed{\{2,1\}}", "(1,2)", 0.0, "a set is neither an ordered pair nor an interval"),
    ("", r"\boxed{(2,1)}", r"\{1,2\}", 0.0, "a set is neither an ordered pair nor an interval"),
    ("", r"\boxed{\{2,1\}}", r"\{1,2\}", 1.0, ""),
    # -- choices and text -----------------------------------------------------------------------
    ("", r"\boxed{\text{(B)}}", "B", 1.0, ""),
    ("", r"\boxed{\text{(C)}}", "B", 0.0, "differs from reference B"),
    ("", r"\boxed{\text{YES}}", "yes", 1.0, ""),  # the string check ignores case
    # infinities of opposite signs differ
    ("", r"\boxed{\infty}", r"-\infty", 0.0, r"answer \infty differs from reference -\infty"),
    # -- bounded time: numbers too large to evaluate are refused, fast ----------------------------
    ("", r"\boxed{2^{3^{20}}}", "5", 0.0, "too large to evaluate"),
    ("", r"\boxed{10^{10^{10}}}", "5", 0.0, "too large to evaluate"),
    ("", r"\boxed{(10^{6})!}", "5", 0.0, "too large to evaluate"),
    ("", r"\boxed{1001!}", "5", 0.0, "too large to evaluate"),
    ("", r"\boxed{(3!)!}", "720", 1.0, ""),
    ("", r"\boxed{\binom{10}{3}}", "120", 1.0, ""),
    ("", r"\boxed{{10 \choose 3}}", "120", 1.0, ""),
    ("", r"\boxed{\binom{10^9}{2}}", "499999999500000000", 1.0, ""),  # a large top, a small coefficient
    ("", r"\boxed{\Gamma(1001)}", "1000!", 1.0, ""),
    ("", r"\boxed{\sum_{k=1}^{100} k}", "5050", 1.0, ""),
    ("", r"\boxed{\sum_{k=1}^{\infty} \frac{1}{k^2}}", r"\frac{\pi^2}{6}", 1.0, ""),  # summed by formula
    ("", r"\boxed{1^{100000}}", "1", 1.0, ""),
    ("", r"\boxed{0^{20000}}", "0", 1.0, ""),  # a power of 0 is small, however large its exponent
    ("", r"\boxed{(-1)^{20001}}", "-1", 1.0, ""),
    ("", r"\boxed{2^{10}}", "1024", 1.0, ""),
    ("", r"\boxed{(2^{10})^{3}}", "1073741824", 1.0, ""),
    ("", r"\boxed{0.5^{9999}}", "2^{-9999}", 1.0, ""),
    # -- units after grouped digits, pi, roots and powers of ten; hedges; superscripts; Chinese text ----------
    ("", r"The total cost is \boxed{1,200 \text{ dollars}}.", "1200", 1.0, ""),
    ("", "Adding up, the answer is 1,500 dollars.", "1500", 1.0, ""),
    ("", "#### 1,500 dollars", "1500", 1.0, ""),
    ("", r"\boxed{1,500 \text{ m}}", "1500", 1.0, ""),
    ("", r"\boxed{2000}", r"2,000 \text{ meters}", 1.0, ""),
    ("", r"\boxed{1,10,100}", r"\{1, 10, 100\}", 1.0, ""),  # a list without spaces, not a number grouped as in India
    ("", r"The area is \boxed{36\pi \text{ cm}^2}.", r"36\pi", 1.0, ""),
    ("", r"\boxed{16\pi\ \text{cm}^2}", r"16\pi", 1.0, ""),
    ("", r"\boxed{2\sqrt{3}\text{ cm}^2}", r"2\sqrt{3}", 1.0, ""),
    ("", r"\boxed{6.02 \times 10^{23} \text{ molecules}}", r"6.02 \times 10^{23}", 1.0, ""),
    ("", r"\boxed{3 \times 10^{8} \text{ m/s}}", "300000000", 1.0, ""),
    ("", r"\boxed{x \text{ cm}}", "5", 0.0, "differs from reference 5"),  # a variable with a unit is no value
    ("", r"So it costs \boxed{\$5 \text{ or } \$6}.", "5", 0.0, "2 distinct value(s)"),  # a hedge of amounts
    ("", r"So it costs \boxed{\$5, \$6, \$7}.", "5", 0.0, ""),
    ("", r"\boxed{5 \text{ (or 6)}}", "6", 0.0, "2 distinct value(s)"),
    ("", r"\boxed{5 \text{ (or 6)}}", "5", 0.0, "2 distinct value(s)"),
    ("", r"\boxed{40 \text{ (or 40 minutes)}}", "40", 1.0, ""),  # a value restated, not a hedge
    ("", r"\boxed{1000 \text{ (or 1,000)}}", "1000", 1.0, ""),
    ("", r"\boxed{5-}", "5", 0.0, "ends with an operator (-): it is incomplete"),  # Math-Verify reads 5
    ("", r"\boxed{5 \times}", "5", 0.0, r"ends with an operator (\times)"),
    ("", r"\boxed{5-}", "5+", 0.0, "is the other side of reference 5+"),
    ("", "The answer is 5 \u2013", "5", 1.0, ""),  # a dash after a space ends the sentence
    ("", "#### 5 -", "5", 1.0, ""),
    ("", r"\boxed{0^+}", "0^{+}", 1.0, ""),  # a one-sided limit's sign is no dangling operator
    ("", r"\boxed{x \to 0^+}", r"x \to 0^{+}", 1.0, ""),
    ("", r"\boxed{0^-}", "0^+", 0.0, "is the other side of reference 0^+"),
    ("", r"\boxed{5²}", "25", 1.0, ""),
    ("", r"\boxed{5²}", "5", 0.0, "differs from reference 5"),
    ("", "so x = 2³", "2", 0.0, "no final answer found"),  # a number against a power is no value
    ("", "The area is 25 m².", "25", 1.0, ""),  # a unit's superscript is no power
    ("", "The volume is 27 cm³.", "27", 1.0, ""),
    ("", "答案是：5", "5", 1.0, ""),
    ("", "答案为：12。", "12", 1.0, ""),
    ("", "共计12元", "12", 1.0, ""),
    ("", "所以他还剩3.5元", "3.5", 1.0, ""),
    ("", "The result is 5, using the coefficient α2", "5", 1.0, ""),  # a Greek or Cyrillic name's digits are no number
    ("", "Thus 5 apples, by Lemma Б3", "5", 1.0, ""),
    # -- numerals in a base, repeating decimals, matrices, multiple choice, mixed numbers ---------------------
    ("", r"\boxed{10112}", "1011_2", 0.0, "a numeral's digits and base are compared"),  # not a digit separator
    ("", r"\boxed{102}", "10_2", 0.0, "a numeral's digits and base are compared"),
    ("", r"\boxed{1234_5}", "1234_{5}", 1.0, ""),
    ("", r"\boxed{01011_{2}}", "1011_2", 1.0, ""),
    ("", r"\boxed{10_3}", "10_2", 0.0, "a numeral's digits and base are compared"),
    ("", r"\boxed{15_{10}}", "15", 1.0, ""),
    ("", r"\boxed{x_1}", "x_1", 1.0, ""),  # a variable's index, not a base
    ("", r"\boxed{0.\overline{6}}", r"0.\overline{3}", 0.0, "differs from reference"),
    ("", r"\boxed{0}", r"0.\overline{3}", 0.0, "differs from reference"),
    ("", r"\boxed{\frac{1}{3}}", r"0.\overline{3}", 1.0, ""),
    ("", r"\boxed{\frac{137}{110}}", r"1.2\overline{45}", 1.0, ""),
    ("", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix} 2 \\ 1 \end{pmatrix}", 0.0, ""),
    ("", r"\boxed{\begin{pmatrix} 1 & 2 \\ 3 & 4 \end{pmatrix}}", r"\begin{pmatrix} 1 & 3 \\ 2 & 4 \end{pmatrix}", 0.0, ""),
    ("", r"\boxed{\begin{pmatrix} 1 \\ 2 \end{pmatrix}}", r"\begin{pmatrix}1\\2\end{pmatrix}", 1.0, ""),
    ("", r"\boxed{\textbf{(C) } 12}", "C", 1.0, ""),
    ("", r"\boxed{\textbf{(C) } 12}", "12", 1.0, ""),
    ("", r"\boxed{\text{(C)}\ 12}", r"\text{(C)}", 1.0, ""),
    ("", r"\boxed{\textbf{(C) } 12}", "D", 0.0, "differs from reference D"),
    ("", r"\boxed{\textbf{(C) } 12}", "13", 0.0, "differs from reference 13"),
    # the reference written as a choice with its value (MATH, AMC): the letter or the value matches it too
    ("", r"\boxed{C}", r"\textbf{(C) } 12", 1.0, ""),
    ("", r"\boxed{(C)}", r"\textbf{(C) } 12", 1.0, ""),
    ("", r"\boxed{12}", r"\textbf{(C) } 12", 1.0, ""),
    ("", r"\boxed{\frac{24}{2}}", r"\textbf{(C) } 12", 1.0, ""),
    ("", r"\boxed{D}", r"\textbf{(C) } 12", 0.0, "differs from reference"),
    ("", r"\boxed{13}", r"\textbf{(C) } 12", 0.0, "differs from reference"),
    ("", r"\boxed{(D) 12}", r"\textbf{(C) } 12", 0.0, "differs from reference"),
    ("", r"\boxed{B}", r"\textbf{(B) } -4", 1.0, ""),
    ("", r"\boxed{-4}", r"\textbf{(B) } -4", 1.0, ""),
    ("", r"\boxed{(D) 0}", r"\textbf{(B)}\ 0", 0.0, "choice (D) differs from reference's choice (B)"),
    # several choices, or a product, are no reference written as one choice: its first letter or factor is wrong
    ("", r"\boxed{A}", r"(A), (C)", 0.0, "differs from reference"),
    ("", r"\boxed{A}", r"\text{(A) and (C)}", 0.0, "differs from reference"),
    ("", r"\boxed{B}", r"(B)\text{ or }(D)", 0.0, "differs from reference"),
    ("", r"\boxed{A}", r"(A) 3, (B) 4", 0.0, "differs from reference"),
    ("", r"\boxed{c}", r"(b)c", 0.0, "differs from reference"),
    ("", r"\boxed{2}", r"(c)2", 0.0, "differs from reference"),
    ("", r"\boxed{\sqrt{2}}", r"(d)\sqrt{2}", 0.0, "differs from reference"),
    ("", r"\boxed{(A) 3}", r"(A) 3, (B) 4", 0.0, "differs from reference"),
    ("", r"\boxed{(A) 3}", r"(A), (C)", 0.0, "differs from reference"),
    ("", r"\boxed{(B) 3}", r"(b)c", 0.0, "differs from reference"),
    # an answer that names several choices is no answer: hedging scores nothing
    ("", r"\boxed{(B), (C)}", r"\textbf{(B)}\ 3", 0.0, "differs from reference"),
    ("", r"\boxed{(B) \text{ or } (C)}", r"\textbf{(B)}\ 3", 0.0, "differs from reference"),
    ("", r"\boxed{(B) 3, (C) 4}", r"\textbf{(B)}\ 3", 0.0, "differs from reference"),
    ("", r"\boxed{\text{(B) and (C)}}", r"\textbf{(B)}\ 3", 0.0, "differs from reference"),
    ("", r"\boxed{(b) 3}", r"\textbf{(B)}\ 3", 1.0, ""),
    # a letter in parentheses inside the value is an argument or a factor, not another choice
    ("", r"\boxed{(C) f(a)}", "C", 1.0, ""),
    ("", r"\boxed{(C) f(a)}", "f(a)", 1.0, ""),
    ("", r"\boxed{(A) 2(b)}", "A", 1.0, ""),
    ("", r"\boxed{C}", r"\textbf{(C) } f(a)", 1.0, ""),
    ("", "So he ran 2 1/2 miles.", r"\frac{5}{2}", 1.0, ""),
    ("", "So he ran 2 1/2 miles.", r"\frac{1}{2}", 0.0, ""),
    # -- the answer phrase ends where a clause begins; an answer after a reasoning block --------------------
    ("", "The answer is 11 because 3*4=12.", "12", 0.0, "differs from reference 12"),
    ("", "The answer is 4, and the sum is 5.", "5", 0.0, "differs from reference 5"),
    ("", "The correct answer is 7, and the wrong one is 8.", "8", 0.0, "differs from reference 8"),
    ("", "The answer is 2, 3, and 5.", r"\{2, 3, 5\}", 1.0, ""),  # a list's "and" is no clause
    ("", "<think>Maybe \\boxed{4}? Let me think more. It's 5.</think>\nThe answer is 5.", "5", 1.0, ""),
    ("", "<think>So \\boxed{5}</think> The final answer is 4.", "5", 0.0, "differs from reference 5"),
    ("", "<think>Maybe the answer is 4.</think>\nSo the final result is 5.", "5", 1.0, ""),
    ("", "<think>It is \\boxed{7}</think>", "7", 1.0, ""),  # nothing after the block: the whole text is read
    ("", "<think>\\boxed{5}</think>\nStep 1: done.", "5", 1.0, ""),  # a marked answer beats a loose number after
    ("", "<think>The sum is \\boxed{5}.</think>\nBob has 5 apples, which is 3 more than Alice.", "5", 1.0, ""),
    ("", "The answer is 3 if n is odd and 4 if n is even.", "3", 0.0, "differs from reference 3"),  # all the cases
    ("", r"The answer is $f(x) = \begin{cases} x & \text{ if } x > 0 \\ 0 & \text{ otherwise} \end{cases}$",
     r"f(x) = \begin{cases} x & \text{ if } x > 0 \\ 0 & \text{ otherwise} \end{cases}", 1.0, ""),  # no cut in math
    ("", "The answer is 12 if rounded to the nearest unit", "12", 1.0, ""),
    ("", r"\boxed{5/}", "5", 0.0, "ends with an operator (/): it is incomplete"),
    ("", r"\boxed{5 +}", "5", 0.0, "ends with an operator (+): it is incomplete"),
    ("", r"\boxed{5^}", "5", 0.0, "ends with an operator (^): it is incomplete"),
    ("", r"\boxed{0+}", "0^+", 1.0, ""),  # a limit's side written without the caret
    ("", r"\boxed{1011_{2}}", r"1011_{\text{two}}", 1.0, ""),  # a base not written in digits: the checkers' to judge
    ("", r"\boxed{15_{10}}", "15.0", 1.0, ""),
    ("", r"\boxed{(C) 12}", "(C) 12", 1.0, ""),  # a choice with its value against the same
    ("", r"\boxed{(C) 12}", "(D) 12", 0.0, ""),
    ("", r"\boxed{(a)^2}", "a^2", 1.0, ""),  # an expression, no choice
    ("", r"\boxed{(a)(b)}", "ab", 1.0, ""),
    ("", "In 2023 1/4 of the students passed.", "1/4", 1.0, ""),  # a year before a fraction: no mixed number
    ("", "Half of 144 is 72.\n**#### 72**", "72", 1.0, ""),  # markdown's emphasis around ####
    ("", "The answer is 5, although it could also be 6.", "5", 0.0, ""),  # a hedge is no answer
    ("", "The answer is 12 unless the endpoints count, in which case it is 14.", "12", 0.0, ""),
    ("", "The answer is 24 if we count rotations as distinct; otherwise 6.", "24", 0.0, ""),
    ("", "The answer is 3 if n is odd, and 4 otherwise.", "3", 0.0, ""),
    ("", "The answer is 4 if n = 5", "4", 1.0, ""),  # a condition, no other answer
    ("", "The answer is x where x = 3.", "3", 1.0, ""),  # a "where" that defines the answer
    ("", "<think>The answer is 42.</think>\n\nThe total number of apples is 42 (6 boxes × 7 apples).", "42", 1.0, ""),
    ("", "<think>Final answer: 9</think>\nThe area is 9 square units (side 3).", "9", 1.0, ""),
    ("", "The answer is A = 25 m².", "25", 1.0, ""),  # a unit's superscript after an assignment
    ("", r"\boxed{V = 27 cm³}", "27", 1.0, ""),
    ("", r"\boxed{1,500 \text{ million}}", "1500", 0.0, ""),  # a scale is no unit
    ("", "#### 1,500 thousand", "1500", 0.0, ""),
    ("", r"\boxed{1,500 \text{ million}}", "1500000000", 1.0, ""),  # a scale multiplies
    ("", "The answer is $2.5 million.", "2500000", 1.0, ""),
    ("", "#### 2.5 Million", "2,500,000", 1.0, ""),
    ("", "The answer is 1.2 billion dollars.", "1200000000", 1.0, ""),
    ("", r"\boxed{3 hundred thousand}", "300000", 1.0, ""),
    ("", "The answer is 2 dozen eggs.", "24", 1.0, ""),
    ("", r"\boxed{2 million, 3 million}", "2000000, 3000000", 1.0, ""),
    ("", r"\boxed{5 million}", "5", 0.0, ""),
    ("", r"\boxed{0.5 thousand}", "5000", 0.0, ""),
    ("", r"\boxed{10^{6} million}", "1000000", 0.0, ""),  # a power's digit is not the number scaled
    ("", r"\boxed{\frac{1}{2} million}", "2", 0.0, ""),
    ("", r"\boxed{1 050 million}", "1050000000", 1.0, ""),  # a number grouped by blanks, scaled whole
    ("", r"\boxed{1 000 million}", "1000000000", 1.0, ""),
    ("", r"\boxed{x = 1 \quad or \quad x = 2}", "1, 2", 1.0, ""),  # a connective right after another's blanks
    ("", r"\boxed{3 \quad and \quad 5}", "3, 5", 1.0, ""),
    ("", r"\boxed{5 (or more)}", "5", 0.0, ""),  # a bound is no value: "or more" would match any answer it follows
    ("", "The answer is 5 or more.", "5", 0.0, ""),
    ("", r"\boxed{\geq 5}", "5", 0.0, ""),
    ("", r"\boxed{≥ 5}", "5", 0.0, ""),
    ("", r"\boxed{x \geq 5}", r"x \geq 5", 1.0, ""),  # a bound against a bound: compared
    ("", r"\boxed{\geq 5}", r"\geq 5", 1.0, ""),
    ("", r"\boxed{5}", r"\geq 5", 0.0, ""),
    ("", r"\boxed{\neq 5}", "5", 0.0, ""),
    ("", r"\boxed{\geqslant 5}", "5", 0.0, ""),  # every spelling of a bound
    ("", r"\boxed{\leqq 5}", "5", 0.0, ""),
    ("", r"\boxed{\not= 5}", "5", 0.0, ""),
    ("", r"\boxed{\geqslant 5}", r"\geq 5", 1.0, ""),
    ("", r"\boxed{(E) 2}", "e", 0.0, ""),  # a choice letter is not Euler's e
    ("", r"\boxed{7_{8}}", "7", 1.0, ""),  # one digit: the same in every base it is below
    ("", "The answer is 8 (in total) because 4 + 4 = 8.", "8", 1.0, ""),  # a bracketed remark after the value
    ("", r"The answer is $6 \text{ (approximately)}$, which is what we wanted.", "6", 1.0, ""),
    ("", r"\boxed{5 (million)}", "5", 0.0, ""),  # words that change the value are no remark
    ("", r"\boxed{5 (squared)}", "5", 0.0, ""),
    ("", r"\boxed{101 (binary)}", "101", 0.0, ""),
    ("", r"\boxed{2(x)}", "2x", 1.0, ""),  # a bracketed letter is a factor
    ("", r"\boxed{2 (e)}", "2", 0.0, ""),
    ("", r"\boxed{E = mc²}", "mc^2", 1.0, ""),  # a superscript after a variable is a power, after a unit the unit's
    ("", r"\boxed{kx²}", "kx^2", 1.0, ""),
    ("", r"\boxed{3 x²}", "3x^2", 1.0, ""),
    ("", r"\boxed{ab²}", "ab", 0.0, ""),
    ("", "The answer is 12, although we may double check.", "12", 1.0, ""),  # a remark, no other value
    ("", "The answer is 12 while the remaining 3 may be discarded.", "12", 1.0, ""),
    ("", "The answer is 12, whereas a naive count or guess gives 10.", "12", 1.0, ""),
    ("", "The final answer is 15 unless otherwise noted.", "15", 1.0, ""),
    ("", "<think>The answer is 5.</think>\nResult: -5", "-5", 1.0, ""),  # the block's answer, not restated
    ("", "<think>The answer is 5.</think>\nThe total is 5,000 dollars.", "5000", 1.0, ""),
    ("", "<think>So the answer is 10.</think>\nAfter 10 minutes the tank holds 35 liters.", "35", 1.0, ""),
    ("", "<think>The answer is 4.</think>\nThe final count is 42 apples, with 4 left over... wait, 42.", "42", 1.0, ""),
    ("", r"\boxed{18 (dollars)}", "18", 1.0, ""),  # a unit or a remark in brackets
    ("", "The answer is 12 (apples).", "12", 1.0, ""),
    ("", r"The answer is $3 \text{ (three)}$.", "3", 1.0, ""),
    ("", r"\boxed{7 (rounded down)}", "7", 1.0, ""),
    ("", r"\boxed{8(in total)}", "8", 1.0, ""),
    ("", "The answer is 6 unless n = 0, or $-6$", "6", 0.0, ""),  # another value offered
    ("", r"The answer is 6 unless n = 0, or \frac{1}{2}", "6", 0.0, ""),
    ("", "The answer is 5, although it could be six", "5", 0.0, ""),
    ("", "The answer is 5, although some may say 7", "5", 0.0, ""),
    ("", "The answer is 12, although one or two steps were skipped.", "12", 1.0, ""),  # "or two steps": no value
    ("", "<think>The answer is 5,000.</think>\nThe total is 5,000 (50 × 100).", "5000", 1.0, ""),  # compared as values
    ("", "<think>The answer is 42.</think>\n42\nThis took 3 steps.", "42", 1.0, ""),  # the first line restates it
    ("", "<think>The answer is 42.</think>\n42 apples [6 boxes × 7 apples].", "42", 1.0, ""),
    ("", "<think>The answer is 42.</think>\n42 because 2 + 2 = 4.", "42", 1.0, ""),
]


@pytest.fixture(scope="module")
def reward() -> MathReward:
    return MathReward()


@pytest.mark.parametrize(("question", "completion", "reference", "score", "reason"), CASES)
def test_case_table(reward, question, completion, reference, score, reason):
    verdict = reward(question, completion, reference)
    assert isinstance(verdict, MathVerdict)
    assert verdict.score == score, verdict.reason
    if score == 1.0:
        assert verdict.reason is None
    else:
        assert verdict.reason is not None and reason in verdict.reason, verdict.reason


def test_case_table_covers_every_category_with_both_outcomes():
    assert len(CASES) >= 50
    zeros = sum(1 for case in CASES if case[3] == 0.0)
    assert 20 <= zeros <= len(CASES) - 20


def test_judge_reports_extracted_answer_reference_and_extractor(reward):
    verdict = reward.judge("", r"so \boxed{12} it is", r"The answer is $\boxed{13}$")
    assert verdict == 0.0
    assert (verdict.extracted, verdict.reference, verdict.extractor) == ("12", "13", "boxed")
    assert verdict.reason == "answer 12 differs from reference 13"
    right = reward.judge("", "The answer is 13.", "13")
    assert (right.score, right.reason, right.extractor) == (1.0, None, "answer_phrase")


def test_missing_reference_and_several_references(reward):
    assert reward.judge("", r"\boxed{2}", None).reason == "no reference answer"
    assert reward.judge("", r"\boxed{2}", ["", None]).reason == "no reference answer"
    assert reward("", r"\boxed{2}", ["3", "2"]) == 1.0
    verdict = reward("", r"\boxed{4}", ["3", "2"])
    assert verdict == 0.0 and verdict.reason == "answer 4 differs from reference 3"


def test_a_verdict_names_the_reference_it_matched_and_a_tuple_lists_references(reward):
    verdict = reward.judge("", r"\boxed{2}", ["3", r"\boxed{2}"])
    assert (verdict.score, verdict.reason, verdict.reference, verdict.extracted) == (1.0, None, "2", "2")
    assert reward("", r"\boxed{2}", ("3", "2")) == 1.0
    verdict = reward("", r"\boxed{4}", ("3", "2"))
    assert verdict == 0.0 and verdict.reason == "answer 4 differs from reference 3" and verdict.reference == "3"


def test_non_text_completion_scores_zero_with_reason(reward):
    for completion in (None, 12, ["a"]):
        verdict = reward("", completion, "12")
        assert verdict == 0.0 and verdict.reason == "no final answer found"


def test_verdict_is_a_float_that_pickles_and_serialises():
    verdict = MathVerdict(0.0, "answer 1 differs from reference 2", "1", "2", "boxed")
    assert isinstance(verdict, float) and verdict + 1 == 1.0 and sum([verdict, 1.0]) == 1.0
    assert json.loads(json.dumps({"score": verdict})) == {"score": 0.0}
    restored = pickle.loads(pickle.dumps(verdict))
    assert isinstance(restored, MathVerdict)
    assert (restored.score, restored.reason, restored.extracted, restored.reference, restored.extractor) == (
        0.0, "answer 1 differs from reference 2", "1", "2", "boxed",
    )
    assert "differs" in repr(verdict)
    assert torch.tensor([MathVerdict(1.0), verdict]).tolist() == [1.0, 0.0]


# --------------------------------------------------------------------------------------------
# extraction options
# --------------------------------------------------------------------------------------------


def test_extractors_are_configurable():
    boxed_only = get_reward("math", extractors=["boxed"])
    verdict = boxed_only("", "The answer is 12.", "12")
    assert verdict == 0.0 and verdict.reason == "no final answer found"
    assert boxed_only("", r"\boxed{12}", "12") == 1.0
    phrase_first = MathReward(extractors=["answer_phrase", "boxed"])
    assert phrase_first.judge("", r"\boxed{3}. The answer is 4.", "4").extractor == "answer_phrase"


@pytest.mark.parametrize("names", [["boxes"], [], ["boxed", "boxed"], "boxed"])
def test_bad_extractor_lists_are_rejected(names):
    with pytest.raises(ValueError, match="extractor"):
        select_extractors(names)
    with pytest.raises(ValueError, match="extractor"):
        get_reward("math", extractors=names)


def test_find_final_answer_names_the_extractor():
    assert find_final_answer(r"x \boxed{5}") == ("boxed", "5")
    assert find_final_answer("<answer>7</answer>") == ("answer_tag", "7")
    assert find_final_answer("work\n#### 72") == ("hashes", "72")
    assert find_final_answer("#### 5\nOn second thought:\n#### 6") == ("hashes", "6")
    assert find_final_answer("it was 3 then 4") == ("last_number", "4")
    assert find_final_answer("nothing") is None
    assert [name for name, _ in ANSWER_EXTRACTORS] == ["boxed", "answer_tag", "answer_phrase", "hashes", "last_number"]


@pytest.mark.parametrize(
    ("question", "completion", "reference", "extracted", "score"),
    [
        # the digits of an expression do not pass for its value, and a restated expression answers nothing
        ("", r"Therefore $x = \frac{3}{2}$", "2", r"\frac{3}{2}", 0.0),
        ("", r"So $x = \sqrt{2}$", "2", r"\sqrt{2}", 0.0),
        ("", r"The area is $4\pi$", "4", r"4\pi", 0.0),
        ("", r"So it is $2^{10}$", "10", None, 0.0),
        ("", "So it is 2^10.", "10", None, 0.0),
        ("", r"so $\gcd(12,18)$", "6", None, 0.0),
        ("", "the result is 1e3", "1", "1e3", 0.0),
        ("", "the result is 1e3", "1000", "1e3", 1.0),
        ("", "So the temperature drops to -3", "-3", "-3", 1.0),
        ("", "So each of the 4 friends gets 1,000/4", "250", "1000/4", 1.0),
        # the value on the number's side of the statement, its words, spacing and end marks left out
        ("", r"Therefore $x = \frac{1}{2}$", "1/2", r"\frac{1}{2}", 1.0),
        ("", r"$x = \frac{\sqrt{3}}{2}$", r"\frac{\sqrt3}{2}", r"\frac{\sqrt{3}}{2}", 1.0),
        ("", r"we get $x \approx 1.414$", r"\sqrt{2}", "1.414", 1.0),
        ("", r"$7 = x$", "7", "7", 1.0),
        ("", r"$x \le 7$", "7", "7", 1.0),
        ("", r"$\implies 7$", "7", "7", 1.0),
        ("", r"$x \in \{7\}$", "7", "7", 1.0),
        ("", r"$x = \mathbf{7}$", "7", "7", 1.0),
        ("", r"$n = 12 \quad (\text{number of sides})$", "12", "12", 1.0),
        ("", r"$\text{Total: } 7 \text{ apples}$", "7", "7", 1.0),
        ("", r"$$\begin{array}{c} 7 \end{array}$$", "7", "7", 1.0),
        ("", r"$7 \; \blacksquare$", "7", "7", 1.0),
        ("", r"Volume = $125\,\mathrm{cm}^3$", "125", "125", 1.0),
        ("", r"So $\$5 + \$2 = \$7$.", "7", "7", 1.0),
        ("", r"so $$\frac{7}{3}$$", "7/3", r"\frac{7}{3}", 1.0),
        # ordinals and angles are numbers, not powers
        ("", r"The $7^{th}$ term", "7", "7", 1.0),
        ("", r"The angle is $30^\circ$.", "30", "30", 1.0),
        # dollars: an escaped one, currency after a number, and a dollar sign before the math opens none
        ("", r"The price is \$5 and then $3 + 4 = 7$", "7", "7", 1.0),
        ("", "It costs 5$ and she pays 2$.", "2", "2", 1.0),
        ("", "He spent $15 and has $7.50 left over, i.e. $7.50$", "7.5", "7.50", 1.0),
        ("", "It costs $5 and $7 in total", "7", "7", 1.0),
        ("", "The price is $5 and the tax is 10%, so the total is 5.5$.", "5.5", "5.5", 1.0),  # prose between: no math
        # units, relations and lists
        ("", r"$12 cm$", "12", "12", 1.0),
        ("", r"$5~\mathrm{cm}$", "5", "5", 1.0),
        ("", r"$x \geqslant 3$", "3", "3", 1.0),
        ("", r"$x \coloneqq 5$", "5", "5", 1.0),
        ("", r"So $x = 5;$", "5", "5", 1.0),
        ("", r"the point is $(2, -3)$", "(2, -3)", "(2, -3)", 1.0),
        ("", r"the primes are $2, 3, 5, 7$", "2, 3, 5, 7", "2, 3, 5, 7", 1.0),
        ("", r"$x = 3 + 2\sqrt{2}$", r"3+2\sqrt2", r"3 + 2\sqrt{2}", 1.0),
        ("", r"$x = \frac{1+\sqrt5}{2}$", r"\frac{1+\sqrt{5}}{2}", r"\frac{1+\sqrt5}{2}", 1.0),
        ("", r"$3 \times 10^{8}$", "300000000", r"3 \times 10^{8}", 1.0),
        ("", r"so $3 + 4$", "7", None, 0.0),  # arithmetic to do, not its result
        # GSM8K: plain numbers, and a percent sign after the number left out (the references are numbers of percent)
        ("", "Natalia sold 48/2 = 24 clips in May, so 48+24 = 72 clips.", "72", "72", 1.0),
        ("By how much percent did it increase?", "The increase is 10/50 = 20%", "20", "20", 1.0),
        ("What is the tax rate?", "So the tax rate is 8%.", "8", "8", 1.0),
        ("How many?", r"$x = 7\%$", "7", "7", 1.0),
    ],
)
def test_the_last_number_is_the_value_it_belongs_to(question, completion, reference, extracted, score):
    assert find_final_answer(completion) == (None if extracted is None else ("last_number", extracted))
    assert float(get_reward("math")(question, completion, reference)) == score


@pytest.mark.parametrize("completion", [
    "$1" * 20_000 + " 7",  # 20,000 unclosed openers
    "$1" + " " * 100_000 + "x$",  # a long blank before what is not a value
    "$" + "1+\\sqrt{2}+" * 8_000 + "1x$",  # a long sum that is not one
    "$" + "1, " * 30_000 + "1x$",  # a long list that is not one
    "The answer is 5" + " " * 100_000 + "\nDone.",  # a long blank where a clause could begin
    "The answer is 5" + ", because" * 20_000,  # many clauses
    "<think>" + "1 " * 30_000 + "</think>" + "2 " * 30_000,  # a long reasoning block and a long tail
    "The answer is $5" + " if" * 33_000,  # clause words inside math, each passed over once
    "The answer is {5" + " because" * 12_500,
    "The answer is 5 if " + "may be 1 " * 10_000,  # many offered alternatives, each looked at within a bound
    "\\boxed{" + "a" * 100_000 + "}",  # a long word: superscripts are looked for at words' starts only
    "The answer is 5 although or" + " " * 30_000 + "x",  # a long blank after "or"
])
def test_the_last_number_reads_long_completions_in_linear_time(completion):
    started = time.perf_counter()
    find_final_answer(completion)
    assert time.perf_counter() - started < 2.0


def test_an_escaped_dollar_inside_math_is_a_currency_sign():
    assert get_reward("math")("", "The answer is about $\\$12$.", "12") == 1.0


@pytest.mark.parametrize(
    ("completion", "reference"),
    [("The answer is therefore 42.", "42"), ("The answer is thus, 7", "7"),
     (r"\boxed{\approx 3.14}", r"\pi"), (r"\boxed{≈ 3.14}", r"\pi"), (r"\boxed{\sim 5}", "5")],
)
def test_filler_words_and_approximately_signs_are_not_part_of_the_answer(completion, reference):
    assert get_reward("math")("", completion, reference) == 1.0


# --------------------------------------------------------------------------------------------
# reading the question, canonical spelling
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "expected"),
    [
        (PERCENT_QUESTION, QuestionHints(percent=True)),
        ("盈利__%？", QuestionHints(percent=True)),
        ("What percentage of the votes did she get?", QuestionHints(percent=True)),
        ("By how many percent did it grow? (in %)", QuestionHints(percent=True)),
        ("A 20% discount is applied. What is the price?", QuestionHints()),
        (REAL_ROOTS_QUESTION, QuestionHints(roots="real")),
        ("Find all real x with x^2 = 4.", QuestionHints(roots="real")),
        ("求方程的实根", QuestionHints(roots="real")),
        (COMPLEX_ROOTS_QUESTION, QuestionHints(roots="complex")),
        ("Find the real and complex roots.", QuestionHints(roots="complex")),
        ("Find all complex roots, where x is a real number.", QuestionHints(roots="complex")),
        ("Give the percentage of students who passed.", QuestionHints(percent=True)),
        ("What is 1000/3 to the nearest integer?", QuestionHints(rounding=True, decimals=0)),
        (ROUNDING_QUESTION, QuestionHints(rounding=True, decimals=2)),
        ("Approximately how far is it, to the nearest mile?", QuestionHints(rounding=True)),
        ("Give the answer to three significant figures.", QuestionHints(rounding=True, significant=3)),
        ("结果保留两位小数。", QuestionHints(rounding=True, decimals=2)),
        ("利润率是百分之几？", QuestionHints(percent=True)),
        (r"Find all $x \in \mathbb{R}$ with $x^4 = 16$.", QuestionHints(roots="real")),
        (r"Find all $z \in \mathbb{C}$ with $z^4 = 16$.", QuestionHints(roots="complex")),
        ("", QuestionHints()),
        (None, QuestionHints()),
    ],
)
def test_read_question(question, expected):
    assert read_question(question) == expected


def test_question_hints_validate_roots():
    with pytest.raises(ValueError, match="roots"):
        QuestionHints(roots="imaginary")


@pytest.mark.parametrize(
    ("answer", "percent", "expected"),
    [
        (r"\dfrac{1}{2}", False, r"\frac{1}{2}"),
        (r"\left(1, 2\right]", False, "(1, 2]"),
        ("1,000", False, "1000"),
        (r"1{,}000", False, "1000"),
        ("1, 000", False, "1, 000"),  # a list, not a thousands separator
        (r"5\text{ cm}", False, "5"),
        ("12 km/h", False, "12"),
        (r"\$5", False, "5"),
        (r"30^\circ", False, "30"),
        (r"96\%", True, "96"),
        (r"96\%", False, r"\frac{96}{100}"),
        ("12.5 percent", False, r"\frac{12.5}{100}"),
        ("π/2", False, r"\pi /2"),
        (r"x = 1 \text{ or } x = 2", False, "x = 1, x = 2"),
        ("3 pi", False, r"3 \pi"),
    ],
)
def test_canonical_answer(answer, percent, expected):
    assert canonical_answer(answer, percent=percent) == expected


# --------------------------------------------------------------------------------------------
# options and bounded time
# --------------------------------------------------------------------------------------------


def test_tolerances_are_relative_to_the_larger_value_and_absolute():
    assert math_equal("1.1", "1.0", tolerance=0.095)
    assert math_equal("1.0", "1.1", tolerance=0.095)
    assert not math_equal("1.1", "1.0", tolerance=0.09)
    assert math_equal("0.001", "0.0015", abs_tolerance=0.001)
    assert not math_equal("0.001", "0.0015")


def test_normalize_answer_strips_one_enclosing_block_and_a_final_period():
    assert normalize_answer(" $5$. ") == "5"
    assert normalize_answer("**x = 5.**") == "x = 5"
    assert normalize_answer(r"$\$12$") == r"\$12"
    assert normalize_answer("$a$ and $b$") == "$a$ and $b$"


def test_default_options_are_the_documented_ones():
    """tolerance 1e-9, abs_tolerance 0, approximation_digits 3, float_rounding 6, timeout 5 s, max_chars 1000, in
    the options and in the reward built without arguments."""
    documented = MathOptions(tolerance=1e-9, abs_tolerance=0.0, approximation_digits=3, float_rounding=6, timeout=5.0,
                             max_chars=1000)
    assert MathOptions() == documented
    assert MathReward().options == documented
    assert get_reward("math").options == documented


def test_float_rounding_option_reaches_math_verify():
    """It rounds the floats of what only Math-Verify reads (here intervals); plain numbers keep the tolerance."""
    assert math_equal("(1.234, 2]", "(1.2341, 2]", float_rounding=3)
    assert not math_equal("(1.234, 2]", "(1.2341, 2]")
    assert not math_equal("1.234", "1.2341", float_rounding=3)
    assert math_equal("1.234", "1.2341", tolerance=1e-4)


def test_decimals_differing_beyond_the_sixth_place_are_not_equal():
    """Math-Verify rounds floats to six decimals; numbers on both sides are judged by the tolerance instead."""
    verdict = MathReward()("", r"\boxed{0.0000001}", "0.0000002")  # half the reference
    assert verdict == 0.0 and verdict.reason == "answer 0.0000001 differs from reference 0.0000002"
    assert not math_equal("1.0000004", "1.0000001")
    assert not math_equal("0.1234567", "0.1234571")
    assert not math_equal("0.0000001, 1", "0.0000002, 1")
    assert math_equal("0.30000000000000004", "0.3") and math_equal("0.0000001", r"\frac{1}{10^{7}}")


def test_a_percent_sign_after_an_expression_means_per_hundred():
    """Not only after a plain number: an expression followed by a percent sign is that many hundredths."""
    assert math_equal(r"\frac{1}{2}\%", "0.005") and math_equal("(1/2)%", r"\frac{1}{200}")
    assert MathReward()("", r"\boxed{\frac{1}{2}\%}", r"\frac{1}{200}") == 1.0
    assert not math_equal(r"\frac{1}{2}\%", "0.5")
    assert math_equal(r"\frac{1}{2}\%", "0.5", question="What percent of the votes did she get?")
    assert canonical_answer(r"\%") == r"\%" and canonical_answer("x\\%") == r"\frac{x}{100}"


def test_the_reason_names_the_side_that_is_too_long_or_has_no_real_value():
    assert MathReward(max_chars=5)("", r"\boxed{4}", "1+1+1+1").reason == \
        "could not parse reference 1+1+1+1: longer than max_chars=5"
    assert MathReward(max_chars=5)("", r"\boxed{1+1+1+1}", "4").reason == \
        "could not parse answer 1+1+1+1: longer than max_chars=5"
    result = compare_answers("5i", "i, -i", question="Find all real roots of p(x) = 0.")
    assert not result.equal and result.reason == \
        "answer 5i differs from reference i, -i (the reference has no real value, and the question asks for real ones)"


def test_max_chars_bounds_the_answer_inclusively_and_the_reference_too():
    assert get_reward("math", max_chars=7)("", r"\boxed{1+1+1+1}", "4") == 1.0  # exactly max_chars: parsed
    assert get_reward("math", max_chars=6)("", r"\boxed{1+1+1+1}", "4") == 0.0
    assert get_reward("math", max_chars=5)("", r"\boxed{4}", "1+1+1+1") == 0.0  # a longer reference: string check only
    assert get_reward("math", max_chars=7)("", r"\boxed{4}", "1+1+1+1") == 1.0


def test_approximation_digits_option():
    assert math_equal("3.14", r"\pi")
    assert not math_equal("3.14", r"\pi", approximation_digits=4)
    assert math_equal("3.142", r"\pi", approximation_digits=4)
    assert not math_equal("3.14159", r"\pi", approximation_digits=0)
    with pytest.raises(ValueError, match="approximation_digits"):
        MathOptions(approximation_digits=-1)


@pytest.mark.parametrize(
    "kwargs", [{"timeout": 0}, {"timeout": -1.0}, {"timeout": float("nan")}, {"max_chars": 0}, {"use_question": "yes"}]
)
def test_reward_option_validation(kwargs):
    with pytest.raises(ValueError):
        get_reward("math", **kwargs)


def test_use_question_false_ignores_the_prompt():
    assert get_reward("math")(PERCENT_QUESTION, r"\boxed{96\%}", "96") == 1.0
    verdict = get_reward("math", use_question=False)(PERCENT_QUESTION, r"\boxed{96\%}", "96")
    assert verdict == 0.0 and "a percent sign means /100" in verdict.reason



def test_a_math_verify_that_cannot_be_imported_raises_instead_of_scoring_zero(monkeypatch):
    # installed when the reward was built, unimportable when it judges (a broken dependency): the ImportError
    # surfaces, where any other failure would score 0 with a reason
    reward = MathReward()
    monkeypatch.setitem(sys.modules, "math_verify", None)
    with pytest.raises(ImportError):
        reward("", r"\boxed{x^2+2x}", "x(x+2)")


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is 42\nbecause 6 times 7 is 42", "42"),  # the phrase's answer ends with its line
        ("The answer is 42. It took 3 steps", "42"),  # or with the sentence
        ("Final answer: 3.5. Done", "3.5"),  # a decimal point is not a sentence end
    ],
)
def test_the_answer_phrase_ends_at_the_end_of_its_line_or_sentence(completion, expected):
    assert find_final_answer(completion) == ("answer_phrase", expected)


@pytest.mark.parametrize("prediction", ["", "   ", "$ $", "."])
def test_an_empty_prediction_is_no_final_answer_whatever_the_reference(prediction):
    for reference in ("7", " "):
        result = compare_answers(prediction, reference)
        assert not result.equal and result.reason == "no final answer found"


def test_math_equal_refuses_options_given_twice():
    with pytest.raises(ValueError, match="either options or option keyword arguments"):
        math_equal("0.5", "1/2", options=MathOptions(), tolerance=1e-3)
    assert math_equal("0.5", "1/2", options=MathOptions()) and math_equal("0.5", "1/2", tolerance=1e-3)

def _slow_checker(comparison) -> bool:
    time.sleep(3.0)
    return True


def test_a_slow_judgement_is_stopped_with_a_timeout_reason():
    options = MathOptions(timeout=0.02)
    handler_before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    result = compare_answers("1", "2", options=options, checkers=[("slow", _slow_checker)])
    assert time.monotonic() - started < 1.5
    assert not result.equal and result.reason.startswith("timeout")
    stopped_at = float(re.search(r"stopped at ([0-9.e-]+) s", result.reason).group(1))
    assert 0.02 <= stopped_at < 1.5  # two significant figures, not 0.0 for a short limit
    # a longer one keeps its tenths, in plain notation: not "stopped at 5 s" after a 5 s limit, nor 1.2e+02
    from entrorl.rewards.math.compare import _timeout_reason

    for limit, elapsed, shown in ((5.0, 5.04, "5.0"), (100.0, 123.44, "123.4"), (1.0, 0.997, "1.0"), (1.0, 0.96, "0.96")):
        assert _timeout_reason("comparing", MathOptions(timeout=limit), time.monotonic() - elapsed).endswith(
            f"took more than {limit:g} s (stopped at {shown} s)")
    # the alarm is disarmed and the previous handler restored afterwards
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) is handler_before


def test_the_time_limit_leaves_an_armed_outer_alarm_alone():
    fired = []
    previous = signal.signal(signal.SIGALRM, lambda *_: fired.append(True))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        assert math_equal("1/2", "0.5")
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0 < remaining <= 0.5
        time.sleep(remaining + 0.2)
        assert fired == [True]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_judge_timeout_is_not_an_exception():
    assert issubclass(JudgeTimeout, BaseException) and not issubclass(JudgeTimeout, Exception)


@pytest.mark.parametrize(
    "completion", [r"\boxed{2^{3^{20}}}", r"\boxed{9^{9^{9^{9}}}}", r"\boxed{(10^{9})!}", r"\boxed{2^{100000}}",
                   r"\boxed{{{{2^{9999}}^{9999}}^{9999}}}",  # each exponent small, the tower's value not
                   # binomial coefficients and Gamma values: those of integers the parser itself computes as it reads
                   r"\boxed{\binom{10^9}{5\cdot 10^8}}", r"\boxed{\binom{1000000}{500000}}", r"\boxed{\binom{10^6}{500000}}",
                   r"\boxed{{10^9 \choose 10^8}}", r"\boxed{{1000000 \choose 500000}}", r"\boxed{\Gamma(10^6)}",
                   r"\boxed{\Gamma\left(1000000\right)}", r"\boxed{\prod_{k=1}^{10^6} k}", r"\boxed{\sum_{k=1}^{10^7} k^k}"]
)
def test_pathological_answers_are_refused_quickly_in_any_thread(reward, completion):
    out = []

    def judge() -> None:
        started = time.monotonic()
        out.append((reward(REAL_ROOTS_QUESTION, completion, "5"), time.monotonic() - started))

    thread = threading.Thread(target=judge, daemon=True)  # one that never ends must not keep the tests from exiting
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    verdict, elapsed = out[0]
    assert verdict == 0.0 and "too large" in verdict.reason
    assert elapsed < 2.0


def test_judging_works_off_the_main_thread(reward):
    out = []
    thread = threading.Thread(target=lambda: out.append(reward(PERCENT_QUESTION, r"\boxed{96\%}", "96")))
    thread.start()
    thread.join()
    assert out == [1.0] and out[0].reason is None


def test_many_judgements_are_fast(reward):
    started = time.monotonic()
    for i in range(200):
        reward("", rf"\boxed{{\frac{{{i}}}{{4}}}}", str(i / 4))
    assert time.monotonic() - started < 5.0


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{" * 20000,  # unclosed boxes: more than a minute when each one was matched to the end
        "\\boxed{1}" + "\\boxed{" * 20000,
        "<answer>" * 20000,  # unclosed tags
        "<ANSWER>" * 20000,
        "The answer" + " " * 30000 + "was 7",  # a long blank after "answer" that no "is" follows
        "\\boxed{" + "**" * 100000 + "}",  # nested ** wrappers around the answer
        "\\boxed{1" + ". " * 100000 + "}",  # trailing periods
    ],
)
def test_finding_the_answer_is_linear_in_the_completion_length(reward, completion):
    started = time.monotonic()
    reward("", completion, "1")
    assert time.monotonic() - started < 5.0


def _slow_extractor(text: str) -> str | None:
    time.sleep(3.0)
    return "1"


def test_finding_the_answer_is_bounded_by_the_timeout(monkeypatch):
    reward = MathReward(timeout=0.2)
    monkeypatch.setattr(reward, "extractors", [("slow", _slow_extractor)])
    handler_before = signal.getsignal(signal.SIGALRM)
    started = time.monotonic()
    verdict = reward("", "anything", "1")
    assert time.monotonic() - started < 1.5
    assert verdict == 0.0 and verdict.reason.startswith("timeout")
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    assert signal.getsignal(signal.SIGALRM) is handler_before


def test_one_judgement_shares_one_timeout_across_references(monkeypatch):
    """Each reference used to get a fresh ``timeout``; the judgement as a whole is what is bounded."""
    calls = []

    def slow_checker(comparison) -> bool:
        calls.append(comparison.reference)
        time.sleep(0.25)
        return False

    MathReward()("", r"\boxed{1}", "2")  # the first judgement in a process imports the LaTeX parser: not timed here
    monkeypatch.setattr(math_compare, "CHECKERS", [("slow", slow_checker)])
    started = time.monotonic()
    verdict = MathReward(timeout=0.4)("", r"\boxed{1}", ["2", "3", "4", "5", "6", "7"])
    # a fresh 0.4 s per reference would take six checks (1.5 s); the shared budget stops it after the first or second
    assert time.monotonic() - started < 1.0
    assert verdict == 0.0 and verdict.reason.startswith("timeout"), verdict.reason
    assert verdict.extracted == "1" and 1 <= len(calls) <= 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (r"\boxed{\boxed{3}}", r"\boxed{3}"),  # a box inside a box is part of its content
        (r"\boxed{1} and \boxed{2", "1"),  # an unclosed last box falls back to the previous one
        (r"\boxed{a} \boxed{\frac{1}{2}} \boxed{", r"\frac{1}{2}"),
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are content
        (r"\boxed{f(x) = \left\{ x, x > 0 \right.}", r"f(x) = \left\{ x, x > 0 \right."),
        (r"\boxed{1}\boxed{2}", "2"),
        (r"\boxed 5 then \fbox{6}", "6"),
        (r"\fbox{6} then \boxed 5$", "5"),
        (r"so \boxed5.", "5."),  # no brace: LaTeX boxes the next token, with or without a space
        (r"so \boxed\pi", r"\pi"),
        (r"so \boxed-3 and \boxed: none", "-3"),
        (r"} \boxed{7} }", "7"),
        ("no box", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<answer>1</answer> then <answer>2</answer>", "2"),
        ("<answer>1</answer> then <answer>2", "1"),
        ("<answer>a<answer>b</answer>", "a<answer>b"),  # the first open tag pairs with the first close tag
        ("<Answer>\n3\n</ANSWER>", "\n3\n"),
        ("</answer><answer>", None),
    ],
)
def test_extract_answer_tag(text, expected):
    assert extract_answer_tag(text) == expected


# --------------------------------------------------------------------------------------------
# exact values, approximations and variable names
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reference", "equal"),
    [
        ("99999999999", "100000000000", False),
        ("123456789012", "123456789013", False),
        ("10^{12}+1", "10^{12}", False),
        ("1000000000001", "10^{12}", False),
        (r"\frac{100000000001}{3}", r"\frac{100000000002}{3}", False),
        ("2^{40}", "1099511627776", True),
        (r"\frac{2}{4}", "1/2", True),
        ("0.30000000000000004", "0.3", True),  # a decimal is inexact: the tolerance applies
        ("100000000000.0", "99999999999", True),
    ],
)
def test_exact_values_are_compared_exactly(answer, reference, equal):
    assert math_equal(answer, reference) is equal


def test_a_tolerance_raised_by_the_caller_applies_to_exact_values():
    assert math_equal("1000001", "1000000", tolerance=1e-5)
    assert not math_equal("1000001", "1000000", tolerance=1e-9)
    assert not math_equal("1000001", "1000000")
    assert math_equal("1000001", "1000000", abs_tolerance=1)


@pytest.mark.parametrize(
    ("question", "answer", "reference", "equal"),
    [
        ("", "1011", r"\frac{2023}{2}", False),
        ("", "1012", r"\frac{2023}{2}", False),
        ("", "500", r"\frac{1001}{2}", False),
        ("", "333", r"\frac{1000}{3}", False),
        ("", "314", r"100\pi", False),
        ("", r"\frac{2023}{2}", "1012", False),
        ("", "333.3", r"\frac{1000}{3}", True),  # a decimal still approximates
        ("", "3.14", r"\pi", True),
        ("", "1011.5", r"\frac{2023}{2}", True),
        ("", "3.142", r"\frac{3143}{1000}", False),
        ("Round each root to one decimal place.", "3.15, 9", "3.1, 3.2", False),
        ("Round each root to one decimal place.", "3.15, 9", "9, 3.2", True),
        ("Round to the nearest integer.", "1012", r"\frac{2023}{2}", True),
        ("Round to the nearest integer.", "1011", r"\frac{2023}{2}", True),
        ("Round to the nearest integer.", "333", r"\frac{1000}{3}", True),
        ("Round to the nearest integer.", "334", r"\frac{1000}{3}", False),
        ("Round to the nearest integer.", "1000000000001", "10^{12}", False),
    ],
)
def test_an_integer_approximates_only_when_the_question_asks_for_rounding(question, answer, reference, equal):
    assert math_equal(answer, reference, question=question) is equal


@pytest.mark.parametrize(
    ("question", "answer", "reference", "equal"),
    [
        ("Round your answer to the nearest hundredth.", "0", "0.33", False),  # coarser than asked: no reward for 0
        ("Round your answer to the nearest hundredth.", "1", "0.67", False),
        ("Round your answer to the nearest hundredth.", "0.3", "0.33", False),
        ("Give the answer to two decimal places.", "0", "0.33", False),
        ("Round to the nearest ten-thousandth.", "0", "0.0012", False),
        ("Round to the nearest tenth.", "12", "12.3", False),
        ("Round your answer to the nearest hundredth.", "0.33", "0.333", True),  # the precision asked
        ("Round your answer to the nearest hundredth.", "0.33", r"\frac{1}{3}", True),
        ("Round to the nearest tenth.", "12.3", "12.34", True),
        ("Round to the nearest whole number.", "0", "0.33", True),
        ("To the nearest mile, how far is it?", "5", "4.6", True),
        ("Round your answer to the tenths place.", "0.3", r"\frac{1}{3}", True),  # other ways to say the precision
        ("Round to the nearest 0.01.", "0.05", "0.048", True),
        ("Round to the nearest 0.01.", "0", "0.048", False),
        ("Round to the nearest 10th.", "0.3", "0.33", True),
        ("Give it to 2 decimals.", "0.05", "0.0512", True),
        ("Give it to 2 decimals.", "0.1", "0.0512", False),
        ("结果保留整数", "3", "3.4", True),
        ("保留小数点后两位", "0.05", "0.048", True),
        ("Round to 3 sig figs.", "0.33", r"\frac{1}{3}", False),
        ("保留三位有效数字", "0.333", r"\frac{1}{3}", True),
        # the instruction, not an earlier "nearest", states the precision
        ("Find the distance to the nearest vertex. Round your answer to the nearest tenth.", "3", "3.46", False),
        ("Find the distance to the nearest vertex. Round your answer to the nearest tenth.", "3.5", "3.46", True),
        # an exact reference: rounded to the precision stated, not cut, and not coarser
        ("Round your answer to four decimal places.", "1.41", r"\sqrt{2}", False),
        ("Round your answer to four decimal places.", "1.4142", r"\sqrt{2}", True),
        ("Round your answer to three decimal places.", "0.666", r"\frac{2}{3}", False),
        ("Round your answer to three decimal places.", "0.667", r"\frac{2}{3}", True),
        ("Give five significant figures.", "3.14", r"\pi", False),
        # the reference's own precision is the reference's
        ("Round to the nearest tenth.", "3.98", "4", True),
        # "round trip" and "year round" ask for no rounding
        ("He drove a round trip of 12 miles. How far per leg?", "12.4", "12", False),
        ("Give three significant figures.", "0.33", r"\frac{1}{3}", False),
        ("Give three significant figures.", "0.333", r"\frac{1}{3}", True),
        ("结果保留两位小数。", "0.3", "0.33", False),
        ("Approximately what is it?", "0.33", "0.333", True),  # no precision stated: a rounding within half the value
        ("Approximately what is it?", "12", "12.3", True),
        ("Approximately what is it?", "9", "9.4", True),
        ("Approximately what is it?", "0", "0.33", False),
        ("Round your answer to the nearest hundredth.", "0.6666", r"\frac{2}{3}", True),  # more digits than asked
        ("Round your answer to the nearest hundredth.", "3.1415", r"\pi", True),
        ("Round your answer to the nearest hundredth.", "0.6749", r"\frac{2}{3}", True),
        ("Round your answer to the nearest hundredth.", "0.6751", r"\frac{2}{3}", False),
        ("Round to the nearest tenth. If the answer is a whole number, write it as an integer.", "3", "3.14", False),
        ("计算 1÷3，结果保留到百分位。", "0", "0.33", False),
        ("结果四舍五入到小数点后两位", "3.14", r"\pi", True),
        # "round", "nearest" and 保留 in another sense ask for no rounding
        ("A round table seats 6 people. What is the probability that two of them sit side by side?", "0",
         r"\frac{2}{5}", False),
        ("In the first round Sam scores 4 points and in the second round 5. What is his average per round?", "4",
         "4.5", False),
        ("Tom bakes a round cake and cuts it into 10 slices for his 2 friends. How many slices does each get?", "4.6",
         "5", False),
        ("一个圆的半径是1厘米，求它的周长。（结果保留π）", "6", r"2\pi", False),
        ("Find the distance from the origin to the nearest point of the line.", "2", r"3-\sqrt{2}", False),
    ],
)
def test_a_rounded_answer_keeps_the_precision_the_question_asks_for(question, answer, reference, equal):
    """The rounding rule accepts an answer rounded as the question asks, not any coarser rounding of the reference (with
    "to the nearest hundredth", 0 rounded every reference below 0.5)."""
    assert math_equal(answer, reference, question=question) is equal


@pytest.mark.parametrize(("answer", "reference", "equal"), [
    ("1e-400", "0", False), ("1e-400", "2e-400", False), ("3e-330", "0", False), ("1e-400", "1e-400", True),
    ("-1e-400", "-1.0e-400", True), (r"10^{400}", "1e400", True), ("1e400", r"10^{400}", True),
    ("1e400", r"10^{400}+1", False), (r"10^{-400}", "1e-400", True),
])
def test_scientific_notation_beyond_the_float_range_is_compared_exactly(answer, reference, equal):
    """1e-400 read as a float is 0, and 1e400 is infinite: their exact values are compared instead."""
    assert math_equal(answer, reference) is equal


@pytest.mark.parametrize("completion", [
    "<think>so the answer is x+1</think>", "<think>The answer is x+1</think>\n\nDone.",
])
def test_an_answer_stated_in_a_closed_block_is_read_without_the_tag(completion):
    """With nothing to read after the block, the whole text is read with its </think> as a line break: the phrase
    "the answer is x+1" no longer takes the tag with it."""
    assert find_final_answer(completion) == ("answer_phrase", "x+1")
    assert MathReward()("", completion, "x+1").score == 1.0


@pytest.mark.parametrize(
    ("answer", "reference", "equal"),
    [
        ("x=3, y=2", "x=2, y=3", False),
        ("a=3, b=2", "a=2,b=3", False),
        ("y=3, x=2", "x=2, y=3", True),
        (r"x=\frac{4}{2}, y=3", "x=2, y=3", True),
        (r"x = 2 \text{ and } y = 3", "x=2, y=3", True),
        ("x_1=2, x_2=3", "x_{1}=2, x_{2}=3", True),
        # numbered names of one letter are the roots of one equation, numbered arbitrarily: a set
        ("x_1=3, x_2=2", "x_1=2, x_2=3", True),
        ("x_1=3, x_2=3", "x_1=2, x_2=3", False),
        ("x_1=3, x_2=2", "2, 3", True),
        ("x_1 = 1, x_2 = -2", "x=1, x=-2", True),
        ("x_1=3, x_2=4", "2, 3", False),
        (r"x=1+\sqrt{2}, y=3", r"y=3, x=\sqrt{2}+1", True),
        (r"x=3, y=1+\sqrt{2}", r"y=3, x=\sqrt{2}+1", False),
        ("(x, y) = (2, 3)", "x=2, y=3", True),
        ("(x, y) = (3, 2)", "x=2, y=3", False),
        ("x=2, z=3", "x=2, y=3", False),
        ("x=2", "x=2, y=3", False),
        ("x=2, x=3", "x=2, y=3", False),
        # a list without names is read by position, the names in the named side's order (no question here)
        ("2, 3", "x=2, y=3", True),
        ("3, 2", "x=2, y=3", False),
        ("(2, 3)", "x=2, y=3", True),
        ("(3, 2)", "x=2, y=3", False),
        ("x=2, y=3", "2, 3", True),
        ("y=3, x=2", "2, 3", False),
        ("y=2, x=3", "2, 3", True),
        ("2, 3", "y=2, x=3", True),
        # x = y = 2 names both, and against one value compares that value
        ("x=y=2", "2", True),
        ("x=y=2", "x=2", True),
        ("x=y=2", "(2, 2)", True),
        ("x=y=2", "3", False),
        ("x=y=2", "x=2, y=2", True),
        ("x=y=2", "x=2, y=3", False),
        # a reference that is a set of values: the answer's named values, unordered
        (r"\{y=3, x=2\}", r"\{2, 3\}", True),
        (r"\{x=2, y=4\}", r"\{2, 3\}", False),
        # the numbered solutions of a system: a set of solutions, however they are numbered
        ("x_1 = 1, y_1 = 2, x_2 = 3, y_2 = 4", "x_1 = 3, y_1 = 4, x_2 = 1, y_2 = 2", True),
        ("x_1 = 1, y_1 = 4, x_2 = 3, y_2 = 2", "x_1 = 1, y_1 = 2, x_2 = 3, y_2 = 4", False),
        (r"x_1 = 1, y_1 = \frac{4}{2}, x_2 = 3, y_2 = 4", "x_2 = 1, y_2 = 2, x_1 = 3, y_1 = 4", True),
        # a set of assignments names its variables too
        (r"\{x=2, y=3\}", "x=2, y=3", True),
        ("x=2, y=3", r"\{y=3, x=2\}", True),
        (r"\{x=3, y=2\}", "x=2, y=3", False),
        ("2, 3, 4", "x=2, y=3", False),
        (r"\{3, 2\}", "x=2, y=3", False),
        ("x=3, 2", "x=3, y=2", False),  # partly named
        # one name repeated is a list of roots: the values count, in any order
        ("x=1, x=-2", "-2, 1", True),
        ("-2, 1", "x=1, x=-2", True),
    ],
)
def test_answers_naming_several_variables_match_name_to_value(answer, reference, equal):
    assert math_equal(answer, reference) is equal


@pytest.mark.parametrize(
    ("question", "answer", "reference", "equal"),
    [
        ("Find the ordered pair (b, a).", "b=2, a=3", "2, 3", True),  # the order the question names them in
        ("Find the ordered pair (b, a).", "a=2, b=3", "2, 3", False),
        ("Find the ordered pair $(a,b)$.", "(3, 2)", "b=2, a=3", True),
        ("Find p and q.", "q=3, p=2", "2, 3", True),
        ("A line has slope m and y-intercept b. Find m and b.", "m = 2, b = 5", "2, 5", True),
        ("A line has slope m and y-intercept b. Find m and b.", "m = 5, b = 2", "2, 5", False),
        ("Find y and x.", "y = 3, x = 2", "3, 2", True),
        # a tuple of exactly the names gives the order, though a name is mentioned first elsewhere (y = mx + b)
        ("Write the line as y = mx + b. Enter the ordered pair (m, b).", "m = 2, b = 5", "(2, 5)", True),
        ("Let x and y be numbers. Enter (y, x).", "x = 2, y = 3", "2, 3", False),
        # a function's arguments or a point's coordinates are not the order asked for
        ("Let f(y, x) = x^2 + y. Solve for the ordered pair (x, y).", "x = 2, y = 3", "(2, 3)", True),
        ("Let f(z, x, y) = 0. Find (x, y, z).", "x = 3, y = 4, z = 2", "(2, 3, 4)", False),
    ],
)
def test_unnamed_values_follow_the_order_of_the_names_in_the_question(question, answer, reference, equal):
    assert math_equal(answer, reference, question=question) is equal


def test_a_long_run_of_digits_is_read_in_linear_time():
    """The percent rule rescanned a run of digits from each digit: 20,000 digits took 29 s off the main thread."""
    import threading

    finished = []
    worker = threading.Thread(target=lambda: finished.append(math_equal("1" * 20000 + "%", "5")))
    worker.start()
    worker.join(timeout=5)
    assert finished == [False]


@pytest.mark.parametrize(
    "answer",
    ["5" + " " * 20000 + "6", "5" + "\t " * 10000 + "x", "x" + " " * 20000 + "\\%", "5" + " " * 20000 + "(",
     "5" + " " * 20000 + "\\circ"],
)
def test_a_long_run_of_blanks_is_read_in_linear_time(answer):
    """The connective, percent and degree patterns were tried from each blank of a run: 8,000 blanks took 7 s."""
    finished = []
    worker = threading.Thread(target=lambda: finished.append(
        (canonical_answer(answer), canonical_answer(answer, percent=True))), daemon=True)
    worker.start()
    worker.join(timeout=3)
    assert len(finished) == 1


def test_a_wrong_assignment_says_which_variable_differs():
    result = compare_answers("x=2, y=4", "x=2, y=3")
    assert not result.equal and "reference value y = 3 is not in the answer" in result.reason
    result = compare_answers("x=2, z=3", "x=2, y=3")
    assert not result.equal and "the answer names x, z, the reference x, y" in result.reason
    result = compare_answers("2, 3, 4", "x=2, y=3")
    assert not result.equal and "the reference names x, y" in result.reason


# --------------------------------------------------------------------------------------------
# reasons through the batch runner
# --------------------------------------------------------------------------------------------


def test_runner_carries_the_math_reasons():
    runner = RewardRunner("math")
    result = runner(
        [PERCENT_QUESTION, "", "", ""],
        [r"\boxed{96\%}", r"\boxed{12}", "no answer", r"\boxed{2}"],
        ["96", "13", "5", None],
    )
    assert result.scores.tolist() == [1.0, 0.0, 0.0, 0.0]
    assert result.reasons == [
        None,
        "answer 12 differs from reference 13",
        "no final answer found",
        "no reference answer",
    ]
    assert result.errors == 0


class _Scored:
    def __init__(self, score, reason):
        self.score = score
        self.reason = reason


def test_runner_accepts_floats_and_scored_objects_and_explains_failures():
    def reward(prompt, completion, answer, **meta):
        if completion == "float":
            return 0.0
        if completion == "scored":
            return _Scored(0.25, "partly right")
        if completion == "scored-no-reason":
            return _Scored(1, None)
        if completion == "bad-score":
            return _Scored("high", "oops")
        raise RuntimeError("verifier crashed")

    completions = ["float", "scored", "scored-no-reason", "bad-score", "raise"]
    result = RewardRunner(reward)(["p"] * 5, completions)
    assert result.scores.tolist() == [0.0, 0.25, 1.0, 0.0, 0.0]
    assert result.reasons[:3] == [None, "partly right", None]
    assert "non-numeric" in result.reasons[3]
    assert result.reasons[4] == "reward raised RuntimeError: verifier crashed"
    assert result.failed.tolist() == [False, False, False, True, True]
    assert result.errors == 2


def test_reward_result_reasons_default_and_length_check():
    scores = torch.tensor([1.0, 0.0])
    result = RewardResult(scores=scores, rewards=scores, correct=scores > 0.5)
    assert result.reasons == [None, None]
    with pytest.raises(ValueError, match="reasons"):
        RewardResult(scores=scores, rewards=scores, correct=scores > 0.5, reasons=["only one"])


def test_answers_longer_than_max_chars_only_get_the_string_check():
    verdict = get_reward("math", max_chars=5)("", r"\boxed{1+1+1+1}", "4")
    assert verdict == 0.0 and "longer than max_chars=5" in verdict.reason
    assert get_reward("math", max_chars=5)("", r"\boxed{1+1+1+1}", "1+1+1+1") == 1.0
    assert get_reward("math")("", r"\boxed{1+1+1+1}", "4") == 1.0


# --------------------------------------------------------------------------------------------
# more edges: powers in prose, separators, units, roots, plus-minus, reasons
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("completion", ["There are 2^n subsets in all", "so the count is 10_"])
def test_a_number_written_before_a_power_or_an_index_is_no_final_answer(completion):
    """Outside math spans a number against ``^`` or ``_`` is part of an expression, on either side of it: the base
    of ``2^n`` is not the answer."""
    assert find_final_answer(completion) is None
    assert MathReward()("", completion, "2").reason == "no final answer found"


def test_a_separator_before_four_digits_is_not_a_thousands_separator():
    """``1{,}000`` and ``1\\,000`` are 1000; ``1{,}2345`` groups four digits, so it is not 12345."""
    assert canonical_answer(r"1{,}000{,}000") == "1000000" and canonical_answer(r"1\,000") == "1000"
    assert canonical_answer(r"1{,}2345") == r"1{,}2345"
    assert canonical_answer(r"1\,2345") == "1 2345"
    assert not math_equal(r"1{,}2345", "12345")


@pytest.mark.parametrize("letter", sorted("mgshlLKCFAVWJN"))
def test_a_single_letter_unit_after_a_number_is_dropped(letter):
    assert canonical_answer(f"5 {letter}") == "5"
    assert MathReward()("", rf"\boxed{{5 {letter}}}", "5") == 1.0


@pytest.mark.parametrize("letter", ["x", "y", "n", "i", "e"])
def test_a_single_letter_variable_after_a_number_is_kept(letter):
    assert canonical_answer(f"5 {letter}") == f"5 {letter}"
    assert MathReward()("", rf"\boxed{{5 {letter}}}", "5") == 0.0


def test_abs_tolerance_also_decides_which_values_are_real():
    """An imaginary part within ``abs_tolerance`` is rounding noise: the value is real and is compared, not left out
    as a non-real value of the answer."""
    assert math_equal("1, 2+0.001i", "1, 2", abs_tolerance=0.01)
    assert not math_equal("1, 2+0.001i", "1, 2")
    assert compare_answers("1, 2+0.001i", "1, 2").reason == \
        "answer 1, 2+0.001i differs from reference 1, 2 (the answer has 1 distinct value(s), the reference 2)"


def test_non_real_values_count_when_the_question_asks_for_complex_roots():
    """Only a question naming no domain leaves out the answer's non-real values against a real reference."""
    assert math_equal("1, 2, i", "1, 2")
    result = compare_answers("1, 2, i", "1, 2", question=COMPLEX_ROOTS_QUESTION)
    assert not result.equal
    assert result.reason == "answer 1, 2, i differs from reference 1, 2 (the answer has 3 distinct value(s), the reference 2)"


def test_a_bare_plus_minus_is_the_value_and_its_negation():
    assert math_equal(r"\pm 2", "-2, 2") and math_equal("2, -2", r"\pm 2")
    assert math_equal(r"\pm \frac{1}{2}", r"\{-0.5, 0.5\}")
    assert not math_equal(r"\pm 2", "2")
    assert compare_answers(r"\pm 2", "2").reason == \
        r"answer \pm 2 differs from reference 2 (the answer has 2 distinct value(s), the reference 1)"


def test_the_reason_for_a_percent_reference_reads_it_as_numbers_of_percent_first():
    """A reference with percent signs is tried as numbers of percent, then as hundredths; the reason of a miss is the
    first reading's, whose values are the ones the reference writes."""
    result = compare_answers("50, 70", r"50\%, 60\%")
    assert not result.equal
    assert result.reason == r"answer 50, 70 differs from reference 50\%, 60\% (reference value 60 is not in the answer)"
    assert math_equal("50, 60", r"50\%, 60\%") and math_equal("0.5, 0.6", r"50\%, 60\%")


def test_leading_zeros_of_a_decimal_are_not_significant_digits():
    """``0.012`` has two significant digits, too few to approximate 1/81 = 0.0123...; ``0.0123`` has three."""
    assert not math_equal("0.012", r"\frac{1}{81}")
    assert math_equal("0.0123", r"\frac{1}{81}")
    assert math_equal("0.012", r"\frac{1}{81}", question="Round to three decimal places.")


def test_the_string_check_also_compares_the_answers_as_written():
    """Equal as written (up to case and spacing) is equal, even where the canonical spellings part: ``m`` is a unit
    that canonical spelling drops, ``M`` is not."""
    assert canonical_answer("5 m") == "5" and canonical_answer("5 M") == "5 M"
    result = compare_answers("5 M", "5 m")
    assert result.equal and result.checker == "string"
    assert compare_answers("PI", "pi").checker == "string"
    # a letter and its combining accent is the composed letter (NFC), as for exact_match and the data audit
    assert compare_answers("CAFE\u0301", "caf\u00e9").equal and not compare_answers("cafe", "caf\u00e9").equal
    # in NFC before the spacing commands are dropped: U+037E is ";", so "a\<U+037E>b" is "a\;b", which is "ab"
    assert compare_answers("a\\\u037eb", "ab").equal and compare_answers("a\\\u037eb", "a\\;b").equal


@pytest.mark.parametrize("written", [r"\$5", "$5", "US$5", "USD 5", "€5", "£5", "¥5", r"\euro 5", r"\pounds 5"])
def test_a_currency_sign_before_the_number_is_dropped(written):
    assert canonical_answer(written) == "5"
    assert canonical_answer(f"-{written}") == "-5"


def test_the_registry_names_every_place_math_and_exact_match_look_for_an_answer():
    from entrorl.rewards import available_rewards
    from entrorl.rewards.math import ANSWER_EXTRACTORS

    assert [name for name, _ in ANSWER_EXTRACTORS] == ["boxed", "answer_tag", "answer_phrase", "hashes", "last_number"]
    descriptions = dict(available_rewards())
    for reward in ("math", "exact_match"):
        assert all(place in descriptions[reward] for place in ("\\boxed{}", "<answer>", "'the answer is'", "####",
                                                               "last number")), descriptions[reward]


@pytest.mark.parametrize(("completion", "reference", "score", "reason"), [
    (r"\boxed{\binom{-10^6}{999999}}", "1", 0.0, "too large to evaluate (a binomial coefficient"),  # -C(1999998, 999999)
    (r"\boxed{\binom{1000000}{-500000}}", "0", 1.0, ""),  # a negative bottom: 0, whatever the top
    (r"\boxed{\binom{10^{400}}{1}}", "10^{400}", 1.0, ""),  # a huge top, a small coefficient
    (r"\boxed{\binom{1000!}{1}}", "1000!", 1.0, ""),
    (r"\boxed{\sum_{k=1}^{2} 2^{10^{9} k}}", "1", 0.0, "too large to evaluate (an exponent above"),  # its term, at k = 2
    (r"\boxed{\prod_{k=1}^{999} k^{k^2}}", "1", 0.0, "too large to evaluate (an exponent above"),
    (r"\boxed{\sum_{j=1}^{999}\sum_{k=1}^{999} k^j}", "1", 0.0, "too large to evaluate (sums or products of more than"),
    (r"\boxed{\sum_{j=1}^{10}\sum_{k=1}^{j} k}", "220", 1.0, ""),  # an inner range that depends on the outer index
    (r"\boxed{\binom{1000000}{500000.0}}", "1", 0.0, "too large to evaluate (a binomial coefficient"),  # 500000.0 is whole
    (r"\boxed{\prod_{k=1}^{999} 10^{10000}}", "1", 0.0, "too large to evaluate (a product of more than"),  # 33M bits
    (r"\boxed{\prod_{k=1}^{5} 10^{400}}", "10^{2000}", 1.0, ""),  # 6645 bits: terms beyond a float, a product within
    ("\\boxed{" + r"\sum_{a=1}^{1}" * 20 + "a}", "1", 1.0, ""),  # 20 one-term ranges: one end each, not 2^20
    (r"\boxed{\prod_{k=0}^{5} k}", "0", 1.0, ""),  # a zero term adds no bits: the product is 0
    (r"\boxed{\sum_{k=1}^{3}\prod_{j=0}^{k} j}", "0", 1.0, ""),
    (r"\boxed{\prod_{k=1}^{999} 10^{-10000}}", "1", 0.0, "too large to evaluate (a product of more than"),  # its denominator
    (r"\boxed{\prod_{k=1}^{999} \frac{10^{9999}+1}{10^{9999}}}", "1", 0.0, "too large to evaluate (a product of more"),
    (r"\boxed{\prod_{k=1}^{3} \frac{k+1}{k}}", "4", 1.0, ""),
    (r"\boxed{\prod_{k=1}^{999} \frac{10^{10000}}{0^{k}}}", "1", 0.0, "too large to evaluate (a product of more"),  # / 0
    (r"\boxed{\prod_{k=1}^{999} \frac{10^{9999}}{10^{9999}}}", "1", 1.0, ""),  # each term reduces to 1
    (r"\boxed{\prod_{k=1}^{999} \frac{2^{1000} k}{2^{1000}}}", "999!", 1.0, ""),
    (r"\boxed{\prod_{k=n}^{n+998} 10^{10000}}", "1", 0.0, "too large to evaluate (a product of more than"),  # ends symbolic
    (r"\boxed{\prod_{k=10^9}^{10^9} 2^{k}}", "1", 0.0, "too large to evaluate (an exponent above"),  # one term, sized
])
def test_binomials_sums_and_products_are_sized_by_their_values_and_their_terms(reward, completion, reference, score,
                                                                             reason):
    """Each in a thread, where no timer bounds the judgement: refused at once, or judged."""
    out = []
    thread = threading.Thread(target=lambda: out.append(reward("", completion, reference)), daemon=True)
    thread.start()
    thread.join(timeout=20)
    assert not thread.is_alive()
    assert float(out[0]) == score and reason in (out[0].reason or "")


def test_a_timed_out_judgement_of_a_sum_leaves_sympy_evaluating():
    """A sum's terms are sized numerically, not built with sympy's process-wide evaluate switch turned off, which a
    timeout landing at the wrong moment would leave off for every later judgement."""
    from sympy.core.parameters import global_parameters

    for _ in range(20):
        compare_answers(r"\sum_{a=1}^{1}" * 14 + "a", "1", options=MathOptions(timeout=0.3))
        assert global_parameters.evaluate is True
    assert compare_answers("2^{10}", "1024").equal and compare_answers("x+x", "2x").equal


@pytest.mark.parametrize(("answer", "reference"), [
    (r"\sum_{k=n}^{n+2} 2^k", r"\sum_{k=n}^{n+2} 2^{k}"), (r"\sum_{k=a}^{a+1} k^2", r"\sum_{k=a}^{a+1} k^{2}"),
    (r"\prod_{k=n}^{n+1} k", r"\prod_{k=n}^{n+1} k"),
])
def test_sums_and_products_with_symbolic_bounds_are_judged(answer, reference):
    """The range from n to n + 2 has 3 terms, but its ends are no numbers to size a term at: the term is judged as
    written, not converted to a float (a TypeError) nor refused as too large."""
    result = compare_answers(answer, reference)
    assert result.equal, result.reason


@pytest.mark.parametrize("reference, completion, expected", [
    ("#### 1,000", "#### 1,000", 1.0),
    ("#### 1,000", "\\boxed{1000}", 1.0),
    ("#### 1,000", "The answer is 1,000", 1.0),
    ("#### 1,000", "\\boxed{100}", 0.0),
    # GSM8K's answer column: a worked solution, then the answer after ####
    ("Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n"
     "#### 10", "#### 10", 1.0),
    ("Total = 1,200 + 34 = 1,234\n#### 1234", "\\boxed{1234}", 1.0),
    ("139+74=213, 213-4=209\n#### 209", "\\boxed{213}", 0.0),
    ("\\boxed{7}, not #### 8", "\\boxed{7}", 1.0),  # a box comes first
    ("\\boxed{}", "The answer is \\boxed{}", 0.0),  # an empty box or #### is no reference, not the text around it
    ("#### ", "The answer is ####", 0.0),
])
def test_a_gsm8k_reference_is_read_after_its_hashes(reference, completion, expected):
    verdict = get_reward("math")("How many?", completion, reference)
    assert float(verdict) == expected, verdict.reason


@pytest.mark.parametrize(("completion", "answer", "refused"), [
    (r"\boxed{" + "(" * 60 + "1" + ")" * 60 + "}", "1", "brackets nested more than 20 deep"),
    (r"\boxed{(x+1)^{2000}}", "x^{2000}", "a sum of symbols to a power above 400 (without a timer"),
])
def test_inputs_that_take_the_parser_or_sympy_minutes_are_refused_off_the_main_thread_too(completion, answer, refused):
    """No timer can be armed off the main thread (verl scores from a pool of threads): deep nesting (the LaTeX parser's
    time grows exponentially with it) and a large power of a sum (sympy expands it) are refused before they run."""
    import threading

    verdicts = []
    worker = threading.Thread(target=lambda: verdicts.append(MathReward()("", completion, answer)), daemon=True)
    worker.start()
    worker.join(30)
    assert verdicts, "the judgement ran for more than 30 s"
    assert verdicts[0].score == 0.0 and refused in verdicts[0].reason


def test_brackets_and_powers_of_sums_within_the_limits_are_still_compared():
    assert MathReward()("", r"\boxed{" + "(" * 20 + "1" + ")" * 20 + "}", "1").score == 1.0
    assert MathReward()("", r"\boxed{(x+1)^{2}}", "x^2+2x+1").score == 1.0
    assert MathReward()("", r"\boxed{(x+1)^{500}}", "(1+x)^{500}").score == 1.0  # the main thread's timer bounds it


@pytest.mark.parametrize(("answer", "reference"), [("-1e400", "1e400"), (r"10^{400}", r"2\cdot10^{400}"),
                                                   ("1e400", "2e400"), ("1e-400", "0")])
def test_a_raised_tolerance_keeps_numbers_beyond_the_float_range_apart(answer, reference):
    """With tolerance raised above its default the exact comparison is skipped; values that floats hold as infinite
    or 0 are then compared with the tolerances in exact arithmetic, not as floats (inf == inf)."""
    assert not math_equal(answer, reference, options=MathOptions(tolerance=1e-5))
    assert math_equal("1e400", "1.000001e400", options=MathOptions(tolerance=1e-5))
