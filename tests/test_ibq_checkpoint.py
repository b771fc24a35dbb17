"""Loading a SEED-Voken IBQ Lightning checkpoint (real key layout) is exact; bad files give one clear error."""
import pytest
import torch
import yaml

from ett_ds.checkpoint import CheckpointError
from ett_ds.config import TokenizerConfig
from ett_ds.tokenizers.checkpoint import load_tokenizer_weights, read_state_dict, tokenizer_config_from_yaml
from ett_ds.tokenizers.ibq import IBQTokenizer as VisionTokenizer

DD = {"double_z": False, "z_channels": 32, "resolution": 32, "in_channels": 3, "out_ch": 3, "ch": 32,
      "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8], "dropout": 0.0}


def write_ibq(tmp_path, with_ema=True):
    """A checkpoint laid out like SEED-Voken's: Lightning dict, loss.* and model_ema.* (dots stripped) keys."""
    cfg = tokenizer_config_from_yaml(write_yaml(tmp_path))
    torch.manual_seed(1)
    src = VisionTokenizer(cfg)
    raw = {k: torch.randn_like(v) for k, v in src.state_dict().items()}
    sd = dict(raw)
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    ema = {}
    if with_ema:
        ema = {k: torch.randn_like(v) for k, v in raw.items()}
        sd.update({"model_ema." + k.replace(".", ""): v for k, v in ema.items()})
        sd["model_ema.decay"] = torch.tensor(0.999)
        sd["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int)
    path = tmp_path / "ibq.ckpt"
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": sd, "optimizer_states": []}, path)
    return path, cfg, raw, ema


def write_yaml(tmp_path):
    path = tmp_path / "ibq.yaml"
    path.write_text(yaml.safe_dump({"model": {"class_path": "src.IBQ.models.ibqgan.IBQ", "init_args": {
        "ddconfig": DD, "n_embed": 64, "embed_dim": 16, "lossconfig": {"target": "x"}}}}))
    return path


def test_yaml_gives_the_architecture(tmp_path):
    cfg = tokenizer_config_from_yaml(write_yaml(tmp_path))
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.attn_resolutions) == (32, [1, 2, 2], 1, [8])
    assert (cfg.codebook_size, cfg.code_dim, cfg.z_channels) == (64, 16, 32)


@pytest.mark.parametrize("use_ema", [True, False])
def test_load_is_exact(tmp_path, use_ema):
    path, cfg, raw, ema = write_ibq(tmp_path)
    tok = VisionTokenizer(cfg)
    report = load_tokenizer_weights(tok, path, use_ema=use_ema)
    want = ema if use_ema else raw
    got = tok.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert report["tensors"] == len(want)


def test_checkpoint_without_ema_loads_raw_weights(tmp_path):
    path, cfg, raw, _ = write_ibq(tmp_path, with_ema=False)
    tok = VisionTokenizer(cfg)
    load_tokenizer_weights(tok, path, use_ema=True)
    assert all(torch.equal(tok.state_dict()[k], raw[k]) for k in raw)


def test_architecture_mismatch_is_one_clear_error(tmp_path):
    path, cfg, _, _ = write_ibq(tmp_path)
    other = TokenizerConfig(**{**vars(cfg), "ch_mult": [1, 2, 2, 2]})
    with pytest.raises(CheckpointError, match="architecture differs"):
        load_tokenizer_weights(VisionTokenizer(other), path)


class NotATensor:
    pass


def test_a_file_without_tensors_and_unreadable_files_are_one_clear_error(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hparams": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="no tensors in its state_dict.*NotATensor.*nothing was run") as e:
        read_state_dict(path)
    assert "weights_only" not in str(e.value)
    with pytest.raises(CheckpointError, match="not found"):
        read_state_dict(tmp_path / "nope.ckpt")
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable"):
        read_state_dict(tmp_path / "junk.ckpt")
