import pytest

from controller.decisions.states import TERMINAL, TRANSITIONS, JobState, advance, is_terminal
from controller.errors import InvalidTransition


def test_every_state_has_a_row_in_the_table():
    assert set(TRANSITIONS) == set(JobState)


def test_the_happy_path_is_allowed():
    state = JobState.SCHEDULED
    for nxt in (JobState.NOTIFYING, JobState.RUNNING, JobState.SUCCEEDED):
        state = advance(state, nxt)
    assert state is JobState.SUCCEEDED and is_terminal(state)


@pytest.mark.parametrize("terminal", sorted(TERMINAL))
def test_terminal_states_never_move(terminal):
    for target in JobState:
        with pytest.raises(InvalidTransition):
            advance(terminal, target)


@pytest.mark.parametrize(
    ("current", "target"),
    [
        ("scheduled", "succeeded"),
        ("running", "scheduled"),
        ("running", "cancelled"),
        ("scheduled", "aborted"),
        ("notifying", "scheduled"),
    ],
)
def test_illegal_transitions_raise_with_both_states(current, target):
    with pytest.raises(InvalidTransition) as info:
        advance(current, target)
    assert current in str(info.value) and target in str(info.value)
