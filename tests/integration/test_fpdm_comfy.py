"""FPDM through real ComfyUI: the MODEL's schedule, core KSampler, our sampler vs the library,
per-run reuse reset, no leaks into the input MODEL, and the shipped FPDM workflows."""

import json
import os
import pathlib
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # tests/ for fpdm_tiny
from fpdm_tiny import save_train_checkpoint, tiny_model  # noqa: E402
from numeric import FAR_ABOVE_ROUNDOFF, ROUNDOFF_SAMPLING, assert_close, assert_differs  # noqa: E402

WORKFLOWS = sorted((pathlib.Path(__file__).resolve().parents[2] / "workflows").glob("fpdm_*.json"))


@pytest.fixture(scope="module")
def fpdm_files(comfy_env, pack_nodes, tmp_path_factory):
    """Tiny FPDM and DiT checkpoints in a registered models/fpdm folder (train.py layout for FPDM)."""
    fp = comfy_env.folder_paths
    root = tmp_path_factory.mktemp("fpdm_models")
    fp.folder_names_and_paths["fpdm"] = ([str(root)], set(fp.supported_pt_extensions))
    run = root / "tiny_run"
    save_train_checkpoint(str(run), tiny_model(seed=1, num_classes=1000))  # ImageNet-sized label table
    with open(run / "args.json") as fh:
        args = json.load(fh)
    args["model"] = "DiT-tiny"
    with open(run / "args.json", "w") as fh:
        json.dump(args, fh)
    torch.save(tiny_model(fixed_point=False, seed=2, num_classes=1000).state_dict(), root / "tiny_dit.pt")
    fp.filename_list_cache.clear()
    return {"fpdm": os.path.join("tiny_run", "checkpoints", "0000100.pt"), "dit": "tiny_dit.pt"}


def _load(pack_nodes, name):
    return pack_nodes["FPDMCheckpointLoader"]().load(name, num_heads=2)[0]


def _latent(n=1, size=8):
    return {"samples": torch.zeros(n, 4, size, size)}


def test_loader_lists_the_fpdm_folder_and_schedule_is_dit(pack_nodes, fpdm_files):
    choices = pack_nodes["FPDMCheckpointLoader"].INPUT_TYPES()["required"]["ckpt_name"][0]
    assert fpdm_files["fpdm"] in choices and fpdm_files["dit"] in choices
    model = _load(pack_nodes, fpdm_files["fpdm"])
    ms = model.get_model_object("model_sampling")
    ab = 1.0 / (1.0 + ms.sigmas.double() ** 2)
    dit = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000))
    # every alpha_bar (down to 4e-5) to float32 precision of the sigmas, relative to itself
    assert float(np.abs(ab.numpy() / dit - 1).max()) <= 2**7 * np.finfo(np.float32).eps
    assert model.model.latent_format.scale_factor == pytest.approx(0.18215)


def test_core_ksampler_runs_and_input_model_is_untouched(comfy_env, pack_nodes, fpdm_files):
    nodes = comfy_env.nodes
    model = _load(pack_nodes, fpdm_files["fpdm"])
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("1: goldfish")
    ks = nodes.KSampler()
    a = ks.sample(model, 3, 4, 3.0, "euler", "normal", pos, neg, _latent(2))[0]["samples"]
    assert a.shape == (2, 4, 8, 8) and torch.isfinite(a).all() and a.abs().sum() > 0
    patched = pack_nodes["FPDMSettings"]().patch(model, iterations=2, reuse=True, allocation="increasing",
                                                 guidance="reference")[0]
    p = ks.sample(patched, 3, 4, 3.0, "euler", "normal", pos, neg, _latent(2))[0]["samples"]
    assert_differs(p, a, FAR_ABOVE_ROUNDOFF, "fixed-point settings vs defaults")
    b = ks.sample(model, 3, 4, 3.0, "euler", "normal", pos, neg, _latent(2))[0]["samples"]
    assert torch.equal(a, b)  # DESIGN.md invariant 4: the settings node patched a clone only


def test_plain_dit_through_samplercustom(comfy_env, pack_nodes, fpdm_files):
    model = _load(pack_nodes, fpdm_files["dit"])
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("x", class_index=5)
    sigmas = pack_nodes["FPDMRespacedSigmas"]().sigmas(model, 5)[0]
    assert sigmas.shape == (6,) and sigmas[-1] == 0
    sampler = pack_nodes["FPDMSamplerSelect"]().get("ddpm")[0]
    custom = comfy_env.nodes.NODE_CLASS_MAPPINGS["SamplerCustom"]()
    out = custom.sample(model, True, 7, 2.0, pos, neg, sampler, sigmas, _latent(1))[0]
    assert out["samples"].shape == (1, 4, 8, 8) and torch.isfinite(out["samples"]).all()


# The same steps written in sigma space (ComfyUI) and in alpha_bar space (the library): round-off only.
TOL_SIGMA_ROUTE = ROUNDOFF_SAMPLING  # measured 7e-7 (ddim), 1.0e-6 (ddpm)


@pytest.mark.parametrize("method", ["ddim", "ddpm"])
def test_fpdm_sampler_node_matches_the_library(comfy_env, pack_nodes, fpdm_files, method):
    """Same weights, noise, settings: ComfyUI's route (sigma space) == the pack's reference-exact pipeline."""
    import comfy.sample

    from asyndm_fpdm.fpdm.loading import load_fpdm
    from asyndm_fpdm.fpdm.pipeline import SampleOptions, generate
    from asyndm_fpdm.fpdm.solver import SolverSettings

    model = _load(pack_nodes, fpdm_files["fpdm"])
    model = pack_nodes["FPDMSettings"]().patch(model, iterations=2, reuse=True, guidance="reference")[0]
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("3: tiger shark")
    seed, steps = 11, 6
    got = pack_nodes["FPDMSampler"]().sample(model, pos, neg, _latent(1), seed, steps, 3.0, method)[0]["samples"]
    noise = comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), seed)
    lib, _ = load_fpdm(os.path.join(comfy_env_models(), fpdm_files["fpdm"]), {"num_heads": 2})
    gen = torch.Generator().manual_seed(seed)
    ref, run = generate(lib, [3], noise, SampleOptions(steps=steps, method=method, cfg_scale=3.0, guidance="reference"),
                        SolverSettings(iterations=2, reuse=True), step_noise=lambda k, shape: torch.randn(shape, generator=gen))
    # ComfyUI hands back latents in VAE space: process_latent_out divides by the SD scale 0.18215
    assert_close(got * 0.18215, ref, TOL_SIGMA_ROUTE, f"ComfyUI route vs the library ({method})")


def comfy_env_models():
    import folder_paths

    return folder_paths.folder_names_and_paths["fpdm"][0][0]


def test_reuse_state_is_reset_every_run(pack_nodes, fpdm_files):
    model = _load(pack_nodes, fpdm_files["fpdm"])
    reuse = pack_nodes["FPDMSettings"]().patch(model, iterations=2, reuse=True)[0]
    plain = pack_nodes["FPDMSettings"]().patch(model, iterations=2, reuse=False)[0]
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("9: ostrich")
    s = pack_nodes["FPDMSampler"]()
    first = s.sample(reuse, pos, neg, _latent(1), 5, 4, 3.0, "ddim")[0]["samples"]
    second = s.sample(reuse, pos, neg, _latent(1), 5, 4, 3.0, "ddim")[0]["samples"]
    other = s.sample(plain, pos, neg, _latent(1), 5, 4, 3.0, "ddim")[0]["samples"]
    assert torch.equal(first, second)
    assert_differs(first, other, FAR_ABOVE_ROUNDOFF, "reuse vs no reuse")


@pytest.mark.parametrize("steps", [1, 3, 7, 20])
@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_fpdm_workflows_execute(pack_nodes, fpdm_files, stand_ins, path, steps):
    from comfy_workflows import run_workflow

    ui = json.loads(path.read_text())
    for node in ui["nodes"]:  # point the loaders at the tiny stand-in checkpoints
        if node["type"] == "FPDMCheckpointLoader":
            node["widgets_values"][0] = fpdm_files["dit"] if "dit" in str(node.get("title", "")).lower() else fpdm_files["fpdm"]
            node["widgets_values"][1] = 2
        if node["type"] == "EmptyLatentImage":
            node["widgets_values"][:2] = [64, 64]
        if node["type"] in ("KSampler", "FPDMSampler"):  # seed, control, steps, ...
            node["widgets_values"][2] = steps
    result = run_workflow(ui)
    assert result.ui, "the workflow produced no output images"


def test_cancel_stops_the_fpdm_sampler(pack_nodes, fpdm_files):
    import comfy.model_management as mm

    model = _load(pack_nodes, fpdm_files["fpdm"])
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("1: goldfish")
    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            pack_nodes["FPDMSampler"]().sample(model, pos, neg, _latent(1), 0, 3, 2.0, "ddpm")
    finally:
        mm.interrupt_current_processing(False)


def test_every_fpdm_node_input_has_a_tooltip(pack_nodes, fpdm_files):
    for name, cls in pack_nodes.items():
        if not name.startswith("FPDM"):
            continue
        for section in cls.INPUT_TYPES().values():
            for inp, spec in section.items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{name}.{inp} has no tooltip"


def test_allocation_follows_comfyui_steps_one_entry_per_step(comfy_env, pack_nodes, fpdm_files):
    from asyndm_fpdm.fpdm.solver import allocate_iterations

    model = _load(pack_nodes, fpdm_files["fpdm"])
    patched = pack_nodes["FPDMSettings"]().patch(model, iterations=4, allocation="increasing")[0]
    block = patched.model.diffusion_model.dit.block_fixed_point
    counts = []
    hook = block.register_forward_hook(lambda *a: counts.append(1))
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("1: goldfish")
    per_step = []

    def cb(step, x0, x, total):
        per_step.append(len(counts))

    import comfy.sample
    import comfy.samplers

    try:
        latent = torch.zeros(1, 4, 8, 8)
        noise = comfy.sample.prepare_noise(latent, 0)
        sampler = comfy.samplers.ksampler("euler")
        sigmas = comfy.samplers.calculate_sigmas(patched.get_model_object("model_sampling"), "normal", 5)
        comfy.sample.sample_custom(patched, noise, 3.0, sampler, sigmas, pos, neg, latent, callback=cb, seed=0)
    finally:
        hook.remove()
    done = [b - a for a, b in zip([0] + per_step[:-1], per_step)]
    assert done == allocate_iterations(4, 5, "increasing")  # cond+uncond share one batched call per step
    assert sum(done) <= 20


def test_v_prediction_zero_snr_options(pack_nodes, fpdm_files):
    import comfy.model_sampling

    model = pack_nodes["FPDMCheckpointLoader"]().load(fpdm_files["fpdm"], num_heads=2, prediction="v",
                                                       zero_terminal_snr="on")[0]
    ms = model.get_model_object("model_sampling")
    assert isinstance(ms, comfy.model_sampling.V_PREDICTION)
    assert float(ms.sigmas[-1]) > 1000  # zero terminal SNR: alpha_bar(T) ~ 0
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("1: goldfish")
    out = pack_nodes["FPDMSampler"]().sample(model, pos, neg, _latent(1), 0, 4, 2.0, "ddpm")[0]["samples"]
    assert torch.isfinite(out).all()


def test_a_checkpoint_trained_by_the_pack_loads_and_samples_in_comfyui(comfy_env, pack_nodes, fpdm_files, tmp_path):
    """images -> `fpdm features` -> `fpdm train` -> models/fpdm/<run>/checkpoints/N.pt -> the loader node
    (heads and conditioning from the run's args.json, no options set) -> core KSampler."""
    import subprocess

    # in a child process: the VAE needs diffusers, which this session must not import (a later test checks that
    # loading the pack did not pull it in)
    tests = str(pathlib.Path(__file__).resolve().parents[1])
    run = os.path.join(comfy_env_models(), "trained_run")
    script = (
        "import sys; sys.path[:0] = [sys.argv[1], sys.argv[2]]; import conftest\n"
        "from asyndm_fpdm.cli import main\n"
        "from fpdm_train_tiny import IMAGE_SIZE, make_images, make_vae, train_argv\n"
        "tmp, run = sys.argv[3], sys.argv[4]\n"
        "images, vae = make_images(tmp + '/images', per_class=3), make_vae(tmp + '/vae')\n"
        "assert main(['fpdm', 'features', '--images', images, '--vae', vae, '--out', tmp + '/feat', "
        "'--image-size', str(IMAGE_SIZE), '--device', 'cpu']) == 0\n"
        "assert main(train_argv(tmp + '/feat', run, '--engine', 'torch', steps=3)) == 0\n")
    proc = subprocess.run([sys.executable, "-c", script, tests, str(pathlib.Path(tests).parent), str(tmp_path), run],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    comfy_env.folder_paths.filename_list_cache.clear()
    name = os.path.join("trained_run", "checkpoints", "0000003.pt")
    model = pack_nodes["FPDMCheckpointLoader"]().load(name)[0]  # num_heads=0: auto, from args.json
    assert model.model.fpdm_config.num_heads == 2 and model.model.fpdm_config.fixed_point
    pos, neg = pack_nodes["FPDMClassConditioning"]().encode("x", class_index=1)
    out = comfy_env.nodes.KSampler().sample(model, 3, 3, 2.0, "euler", "normal", pos, neg, _latent(1))[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
