"""Countdown: expression values, the enumeration of valid answers and the reward, by hand."""

import pytest

from flowrl_jax.experiments.countdown.task import (EOS, Problem, all_expressions, decode_answer,
                                                   encode_answer, evaluate, reward,
                                                   split_problems, valid_answers)


@pytest.mark.parametrize("expr, value", [("2+3*4", 14), ("3*4-2", 10), ("9-1-2", 6),
                                         ("2-3*4", -10), ("7*8*9", 504), ("5-9", -4)])
def test_evaluate_multiplies_first_and_subtracts_left_to_right(expr, value):
    assert evaluate(expr) == value


def test_valid_answers_numbers_2_3_4_target_10_by_hand():
    # 2-number answers reach at most 3*4 = 12 and none makes 10; with all three:
    # 2*3+4 (and its commuted forms 3*2+4, 4+2*3, 4+3*2) and 3*4-2 (4*3-2).
    assert valid_answers(Problem((2, 3, 4), 10)) == [
        "2*3+4", "3*2+4", "3*4-2", "4*3-2", "4+2*3", "4+3*2"]


def test_valid_answers_mixed_lengths_by_hand():
    # target 4 from (1, 5, 9): 5-1 and 9-5 (2 numbers), and 9-5 with a "*1" anywhere it
    # keeps the value: 1*9-5, 9*1-5, 9-1*5, 9-5*1 (3 numbers).
    assert valid_answers(Problem((1, 5, 9), 4)) == [
        "1*9-5", "5-1", "9*1-5", "9-1*5", "9-5", "9-5*1"]


def test_all_expressions_count():
    # ordered pairs 6 × 3 operators + ordered triples 6 × 9 operator pairs
    assert len(all_expressions((2, 3, 4))) == 18 + 54
    assert len(set(all_expressions((2, 3, 4)))) == 72


def test_reward():
    p = Problem((2, 3, 4), 10)
    for expr in valid_answers(p):
        assert reward(p, encode_answer(expr)) == 1.0
    assert reward(p, encode_answer("2*3+4")[:-1]) == 0.0  # no EOS: unfinished
    assert reward(p, encode_answer("2+3")) == 0.0  # wrong value
    assert reward(p, encode_answer("4")) == 0.0  # one number is not an answer
    assert reward(p, encode_answer("2*4+2")) == 0.0  # 2 used twice (value 10)
    assert reward(p, encode_answer("5*2")) == 0.0  # 5 is not given (value 10)
    assert reward(p, [EOS]) == 0.0 and reward(p, []) == 0.0
    # tokens after the first EOS are ignored
    assert reward(p, encode_answer("3*4-2") + [5, 6]) == 1.0


def test_encode_decode_round_trip_and_malformed():
    for e in all_expressions((1, 7, 9)):
        assert decode_answer(encode_answer(e)) == e
    assert decode_answer(encode_answer("2+3")[1:]) is None  # starts with an operator
    assert decode_answer([EOS]) is None


def test_problem_rejects_bad_input():
    with pytest.raises(ValueError, match="numbers"):
        Problem((3, 2, 4), 10)
    with pytest.raises(ValueError, match="target"):
        Problem((2, 3, 4), 100)


def test_heldout_problems_use_unseen_number_sets():
    train, held = split_problems(32)
    assert len(held) == 32
    assert not {p.numbers for p in train} & {p.numbers for p in held}
    assert all(len(valid_answers(p)) >= 3 for p in train + held)
    assert split_problems(32) == (train, held)  # deterministic
