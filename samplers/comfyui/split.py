"""One AsynDM run split over step ranges, as ComfyUI's KSamplerAdvanced splits a run (Wan 2.2's two
experts: the high-noise model for the first steps, the low-noise model for the rest).

The plan is built for the whole run in every pass and each pass steps through its own window of
it (plan.PlanWindow). A pass that ends early hands on, in its LATENT, the plan's state at its end
step (plan.PlanState under ``STATE_KEY``) beside the latent with its leftover noise, so the next
pass continues the same per-token plan: lagging tokens keep their lag across the switch
(DESIGN.md, "Runs split over step ranges").
"""

from ..plan import PlanWindow, leftover, resume

STATE_KEY = "asyndm_plan"


class StepWindow:
    """Steps ``start``..``end``-1 of a run over ``sigmas`` (the whole schedule), continuing ``state``."""

    def __init__(self, sigmas, start: int, end: int, state=None):
        self.sigmas, self.start, self.end, self.state = sigmas, int(start), int(end), state
        self.plan = self.left = None

    def enter(self, plan):
        """The window of ``plan`` (built over the whole schedule), standing at the window's start."""
        if self.start > 0 and self.state is not None:
            if self.state.step != self.start:
                raise ValueError(f"the latent carries an AsynDM run stopped at step {self.state.step}, but this pass "
                                 f"starts at step {self.start}: set start_at_step to {self.state.step}")
            resume(plan, self.state)
        elif self.start > 0:
            if plan.dynamic or plan.capture_all:
                raise ValueError(
                    f"start_at_step {self.start} continues a run whose masks come from the model's attention, but the "
                    "latent carries no AsynDM plan: connect the LATENT of the 'Asynchronous KSampler (Advanced)' that "
                    f"ran steps 0-{self.start} (mode 'vanilla', DMconcave and mask input continue any latent)")
            for i in range(self.start):  # fixed masks: the first steps' plan needs no model
                plan.step(i)
            plan.capture_pending = False
        self.plan = plan
        return PlanWindow(plan, self.start, self.end)

    def finish(self):
        """After the pass: the state the next pass continues from (at the last step: the whole run's record)."""
        self.left = leftover(self.plan, self.end)
        return self.left


def sample_range(model, positive, negative, latent: dict, *, seed: int, steps: int, start: int, end: int,
                 options, scheduler: str, sampler_name: str, **kwargs):
    """The AsynDM KSampler (Advanced): steps ``start``..``end``-1 of a ``steps``-step run, as
    KSamplerAdvanced runs them (noise added only from step 0; a later start continues the latent, which
    here also carries the run's plan). Returns (latent dict with the plan's state, RunRecord of the
    run up to ``end``)."""
    from ..engine import RunRecord
    from .sampler import LAST_STEPS, asyndm_sample, image_scale, max_timestep, node_sigmas

    sigmas = node_sigmas(model, scheduler, steps, 1.0, sampler_name, LAST_STEPS[1])
    total = len(sigmas) - 1
    start, end = max(0, int(start)), min(int(end), total)
    if options.mode == "asyn" and options.mask_source == "static" and (start > 0 or end < total):
        raise ValueError("mask source 'static' needs the whole run for its pre-pass: in a run split over step ranges "
                         "use 'dynamic', or the Mask Extractor's masks through 'mask input'")
    state = latent.get(STATE_KEY) if start > 0 else None
    out = {k: v for k, v in latent.items() if k != STATE_KEY}
    if start >= end:  # nothing to run: the latent as it came, as KSamplerAdvanced returns it
        shown = dict(max_timestep=max_timestep(model.get_model_object("model_sampling")),
                     image_scale=image_scale(model.get_model_object("latent_format")))
        if state is not None:
            out[STATE_KEY] = state
            return out, RunRecord(ks=list(state.ks), timestep_maps=list(state.timestep_maps),
                                  masks=list(state.mask_history), item_maps=list(state.item_maps), **shown)
        return out, RunRecord(**shown)
    window = StepWindow(sigmas, start, end, state)
    result, record = asyndm_sample(model, positive, negative, out, seed=seed, steps=end - start,
                                   sampler_name=sampler_name, scheduler=scheduler, options=options,
                                   sigmas=sigmas[start:end + 1], window=window, **kwargs)
    result[STATE_KEY] = window.left
    return result, record
