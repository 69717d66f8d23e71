"""Engine environments without the engine: made once under the cache, reused, resumed after a setup that did
not finish, refused in one line (naming the engine and the step) when missing or broken."""

from __future__ import annotations

import pytest

from deepspec.engines import env as engines


@pytest.fixture
def fake_engine(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSPEC_CACHE", str(tmp_path / "cache"))
    spec = engines.EngineSpec(packages=(), check="import json", versions_of=("pip",))
    monkeypatch.setitem(engines.ENGINES, "fake", spec)
    return spec


def test_setup_records_versions_and_is_reused(fake_engine, capsys):
    assert engines.find("fake") is None
    with pytest.raises(engines.EngineError, match=r"^engine fake: no environment at .*; run `deepspec engine setup fake`$"):
        engines.require("fake")
    made = engines.setup("fake")
    assert made.python.is_file() and set(made.record["versions"]) == {"pip"}
    assert engines.require("fake").record == made.record
    again = engines.setup("fake")  # reused: nothing is made again
    assert "ready at" in capsys.readouterr().out and again.record == made.record

    (made.folder / "engine.json").unlink()  # a setup killed before its record: the next one resumes it
    assert engines.find("fake") is None
    engines.setup("fake")
    assert "resuming the setup" in capsys.readouterr().out and engines.find("fake") is not None


def test_a_failing_step_is_one_line_naming_engine_and_step(fake_engine, monkeypatch):
    monkeypatch.setitem(engines.ENGINES, "fake", engines.EngineSpec(packages=(), check="import no_such_module_here"))
    with pytest.raises(engines.EngineError) as err:
        engines.setup("fake")
    msg = str(err.value)
    assert msg.startswith("engine fake: step `python -c 'import no_such_module_here'` failed: ") and "\n" not in msg
    assert "No module named 'no_such_module_here'" in msg
    assert engines.find("fake") is None  # no record: not ready
    with pytest.raises(engines.EngineError, match=r"^engine nope: unknown \(engines: vllm, llamacpp, fake\)$"):
        engines.setup("nope")
