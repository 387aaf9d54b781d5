"""tests/ci_skips.py on inner pytest sessions: under CI=true a skip fails the run, except gpu and
opt_in tests; outside CI a skip stays a skip."""

from __future__ import annotations

import pytest

INNER = '''
import pytest

def test_missing_dependency():
    pytest.importorskip("no_such_module_tdist_ci")

@pytest.mark.skipif(True, reason="tool missing")
def test_skipif():
    pass

@pytest.mark.gpu
def test_gpu():
    pytest.skip("needs a CUDA GPU")

@pytest.mark.opt_in
def test_opt_in():
    pytest.skip("set X=1 to run")

@pytest.mark.xfail(reason="known")
def test_xfail():
    assert False

def test_plain():
    assert True
'''


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\nmarkers =\n    gpu: gpu\n")
    pytester.makepyfile(test_inner=INNER)
    return pytester


def test_skips_fail_under_ci_except_gpu_and_opt_in(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest_inprocess("-p", "tests.ci_skips", "-rA")
    # a skip in the call fails the test; a skipif (decided at setup) makes it an error
    result.assert_outcomes(passed=1, failed=1, errors=1, skipped=2, xfailed=1)
    result.stdout.fnmatch_lines(["*test_missing_dependency*skipped under CI=true*no_such_module_tdist_ci*"])
    result.stdout.fnmatch_lines(["*test_skipif*skipped under CI=true*tool missing*"])
    assert result.ret == 1


def test_skips_stay_skips_outside_ci(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest_inprocess("-p", "tests.ci_skips")
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert result.ret == 0


def test_a_module_that_skips_itself_fails_under_ci(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    pytester.makepyfile(test_mod='import pytest\npytest.importorskip("no_such_module_tdist_ci")\n\ndef test_x():\n    pass\n')
    result = pytester.runpytest_inprocess("-p", "tests.ci_skips")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*skipped under CI=true*"])
