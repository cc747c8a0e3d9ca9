"""FPDM/DiT checkpoint loading: every path, shape inference, clear errors, refused pickles."""

import json

import pytest
import torch

from asyndm_fpdm.fpdm.loading import CheckpointError, infer_config, load_fpdm
from fpdm_tiny import HEADS, save_train_checkpoint, tiny_model


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_train_checkpoint_prefers_ema_and_reads_args_json_one_folder_up(tmp_path):
    model, ema = tiny_model(seed=1), tiny_model(seed=2)
    path = save_train_checkpoint(str(tmp_path), model, ema)
    loaded, info = load_fpdm(path, HEADS)
    assert info["entry"] == "ema" and info["args_json"]
    assert _same_weights(loaded, ema) and not _same_weights(loaded, model)


def test_model_entry_is_the_fallback(tmp_path):
    model = tiny_model(seed=3)
    path = tmp_path / "ck.pt"
    torch.save({"model": model.state_dict()}, path)
    loaded, info = load_fpdm(str(path), dict(HEADS, pre_post_timestep_conditioning=False, prediction="eps",
                                             zero_terminal_snr=False))
    assert info["entry"] == "model" and _same_weights(loaded, model)


def test_raw_plain_dit_state_dict_and_safetensors(tmp_path):
    from safetensors.torch import save_file

    dit = tiny_model(fixed_point=False, seed=4)
    torch.save(dit.state_dict(), tmp_path / "dit.pt")
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp_path / "dit.safetensors"))
    for name in ("dit.pt", "dit.safetensors"):
        loaded, info = load_fpdm(str(tmp_path / name), HEADS)
        assert not loaded.config.fixed_point and loaded.config.depth == 3
        assert _same_weights(loaded, dit)
        x, t, y = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.tensor([1])
        assert torch.equal(loaded(x, t, y), dit(x, t, y))


def test_shape_inference(tmp_path):
    m = tiny_model(pre_depth=2, post_depth=3, learn_sigma=False, num_classes=7, pre_post_timestep_conditioning=True)
    cfg, src = infer_config(m.state_dict(), {"fixed_point_pre_post_timestep_conditioning": True, "predict_v": True,
                             "use_zero_terminal_snr": False},
                            {"num_heads": 2})
    assert (cfg.hidden_size, cfg.patch_size, cfg.in_channels) == (32, 2, 4)
    assert (cfg.pre_depth, cfg.post_depth, cfg.num_classes, cfg.learn_sigma) == (2, 3, 7, False)
    assert cfg.fixed_point and cfg.pre_post_timestep_conditioning and cfg.prediction == "v"
    assert src["num_heads"] == "option" and src["prediction"] == "args"


def test_heads_from_model_name_in_args():
    m = tiny_model(hidden_size=48, num_heads=6)
    sd = m.state_dict()
    cfg, src = infer_config(sd, {"model": "DiT-S/2", "fixed_point_pre_post_timestep_conditioning": False,
                                 "predict_v": False, "use_zero_terminal_snr": False})
    assert cfg.num_heads == 6 and "DiT-S/2" in src["num_heads"]


def test_missing_facts_give_a_clear_error(tmp_path):
    m = tiny_model()
    torch.save(m.state_dict(), tmp_path / "fp.pt")
    with pytest.raises(CheckpointError, match="pre_post_timestep_conditioning.*args.json"):
        load_fpdm(str(tmp_path / "fp.pt"), HEADS)
    with pytest.raises(CheckpointError, match="attention heads"):
        load_fpdm(str(tmp_path / "fp.pt"))


def test_args_json_beside_checkpoint(tmp_path):
    m = tiny_model(prediction="v", zero_terminal_snr=True)
    torch.save(m.state_dict(), tmp_path / "fp.pt")
    (tmp_path / "args.json").write_text(json.dumps({"fixed_point_pre_post_timestep_conditioning": False,
                                                    "predict_v": True, "use_zero_terminal_snr": True}))
    loaded, info = load_fpdm(str(tmp_path / "fp.pt"), HEADS)
    assert info["args_json"] and loaded.config.prediction == "v" and loaded.config.zero_terminal_snr


def test_partial_or_wrong_file_names_missing_and_unexpected_keys(tmp_path):
    sd = tiny_model().state_dict()
    del sd["block_pre_projection.weight"]
    sd["not_a_dit_layer.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    opts = dict(HEADS, pre_post_timestep_conditioning=False, prediction="eps", zero_terminal_snr=False)
    with pytest.raises(CheckpointError) as err:
        load_fpdm(str(tmp_path / "bad.pt"), opts)
    assert "missing keys" in str(err.value) and "block_pre_projection.weight" in str(err.value)
    assert "unexpected keys" in str(err.value) and "not_a_dit_layer.weight" in str(err.value)
    torch.save({"w": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not look like a DiT"):
        load_fpdm(str(tmp_path / "other.pt"), opts)


class _Evil:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_code_executing_pickle_is_refused(tmp_path):
    target = tmp_path / "pwned.txt"
    path = tmp_path / "evil.pt"
    torch.save({"ema": {"x_embedder.proj.weight": torch.zeros(1)}, "payload": _Evil(str(target))}, path)
    with pytest.raises(CheckpointError, match="refused"):
        load_fpdm(str(path), HEADS)
    assert not target.exists()
