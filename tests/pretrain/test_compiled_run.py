"""`hippo train` with `train.compile: true`: the blocks compiled in place train like eager ones
(losses within 1e-5 relative: inductor reassociates sums), and checkpoints stay interchangeable:
a compiled run resumes bitwise from its own checkpoint, and from an eager run's (same keys).

Dropout stays off: inductor draws its own random masks, not eager's. Each compiled process
compiles again; inductor's cache (shared by the processes, `TORCHINDUCTOR_CACHE_DIR`) makes the
later ones cheaper.
"""

from __future__ import annotations

import pytest

from tests.helpers import hippo_train, losses

STEPS = 8
RUN = (f"train.steps={STEPS}", "checkpoint.interval=4", "train.eval_interval=0")
COMPILED = "train.compile=true"

pytestmark = [pytest.mark.compile, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def eager(train_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("eager")
    hippo_train(run, train_data, *RUN, "train.compile=false")
    return run


@pytest.fixture(scope="module")
def compiled(train_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("compiled")
    out = hippo_train(run, train_data, *RUN, COMPILED)
    assert "compiled 4 blocks in" in out.stderr and "(4 graphs, 0 graph breaks)" in out.stderr, out.stderr[-3000:]
    return run


def test_a_compiled_run_trains_like_eager_and_resumes_from_either_checkpoint(eager, compiled, train_data,
                                                                            tmp_path):
    want, got = losses(eager), losses(compiled)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (step, got[step], want[step])

    own = tmp_path / "own"  # from its own checkpoint: bitwise what the uninterrupted run did
    hippo_train(own, train_data, *RUN, COMPILED, "--resume", str(compiled / "checkpoints" / "global_step4"))
    resumed = losses(own)
    assert sorted(resumed) == list(range(5, STEPS + 1))
    assert all(resumed[s] == got[s] for s in resumed), (resumed, got)

    other = tmp_path / "from_eager"  # from an eager run's: the same keys load, training goes on alike
    hippo_train(other, train_data, *RUN, COMPILED, "--resume", str(eager / "checkpoints" / "global_step4"))
    crossed = losses(other)
    assert sorted(crossed) == list(range(5, STEPS + 1))
    assert all(abs(crossed[s] - want[s]) <= 1e-5 * abs(want[s]) for s in crossed), (crossed, want)
