import subprocess
import sys

from typer.testing import CliRunner

from nanosae import SAE, SAEConfig
from nanosae.cli import app


def test_info_prints_config_and_shapes(tmp_path):
    SAE(SAEConfig(d_in=8, d_sae=32, architecture="topk", k=4, hook_name="blocks.1.hook_resid_post")).save(tmp_path)
    result = CliRunner().invoke(app, ["info", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for text in ("topk", "blocks.1.hook_resid_post", "W_enc", "(8, 32)", "W_dec", "(32, 8)"):
        assert text in result.output


def test_error_is_one_line_without_traceback(tmp_path):
    (tmp_path / "cfg.json").write_text("{broken")
    proc = subprocess.run([sys.executable, "-c", "from nanosae.cli import main; main()", "info", str(tmp_path)],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cfg.json is not valid JSON" in lines[0], proc.stderr
