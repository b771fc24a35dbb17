"""Expected failures of `python -m ett_ds.train` are one line on stderr and exit code 2 (ETT_DEBUG=1 re-raises)."""
import pytest

from data_tools.tario import ShardTarWriter, sample_key
from ett_ds.engine import dist
from ett_ds.train import main
from tests.tiny import SHRINK, train_spm


def garbage_shards(folder):
    folder.mkdir(parents=True)
    with ShardTarWriter(folder / "t-000000.tar") as w:
        for i in range(20):
            w.write(sample_key(0, i), {"png": b"not an image at all", "txt": b"caption"})
    return folder


@pytest.mark.parametrize("workers", [0, 1])
def test_data_error_rate_is_one_line_exit_2(tmp_path, capsys, monkeypatch, workers):
    """With a worker, the error crosses the DataLoader wrapped in its traceback; the line is still the message."""
    dist.init_distributed()
    monkeypatch.delenv("ETT_DEBUG", raising=False)
    spm = train_spm(tmp_path / "spm")
    data = garbage_shards(tmp_path / "bad")
    args = ["--config", "tiny", f"out_dir={tmp_path}", "name=r", f"data.train={data}", "stage=tokenizer",
            f"model.llm.text_tokenizer={spm}", *SHRINK, f"data.num_workers={workers}", "train.max_steps=2"]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("train:")]  # not the progress bar
    assert len(lines) == 1 and lines[0].startswith("error: data error rate") and "unreadable" in lines[0], err
    assert "Traceback" not in err
    monkeypatch.setenv("ETT_DEBUG", "1")
    from ett_ds.data.decode import DataErrorRateExceeded
    with pytest.raises(DataErrorRateExceeded):
        main(args + ["name=r2"])


def test_a_garbage_safetensors_tokenizer_checkpoint_is_a_one_line_error(tmp_path):
    """It used to escape as SafetensorError ('header too large') with a traceback."""
    from ett_ds.checkpoint import CheckpointError
    from ett_ds.tokenizers.checkpoint import read_state_dict
    bad = tmp_path / "tok.safetensors"
    bad.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError) as e:
        read_state_dict(bad)
    assert len(str(e.value).splitlines()) == 1 and str(bad) in str(e.value)
