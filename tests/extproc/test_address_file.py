"""The ext_proc's bound admin address reaches its starter whole: `signalbox up` waits for the
file to exist and reads it at once, so the file must appear with its content (found in CI: a
file created, then written, was read empty)."""

import os
from pathlib import Path

from signalbox.extproc import main


def test_the_address_file_appears_whole(tmp_path, monkeypatch):
    target = tmp_path / "admin.address"
    seen = []
    real_replace = os.replace

    def replace(src, dst):
        # The moment the file appears under its name: it must not exist before, and the
        # content moving in must be complete.
        seen.append((os.path.exists(dst), Path(src).read_text()))
        real_replace(src, dst)

    monkeypatch.setattr(main.os, "replace", replace)
    main.publish_address(target, "127.0.0.1:43210")
    assert seen == [(False, "127.0.0.1:43210")]
    assert target.read_text() == "127.0.0.1:43210"
    assert [p.name for p in tmp_path.iterdir()] == ["admin.address"]
