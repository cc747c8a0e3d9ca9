"""AsynDM preview nodes: timestep curves and per-step regions as IMAGEs."""

import logging

from ..samplers.comfyui.conditioning import parse_ks
from ..samplers.curves import CURVE_TYPES
from .asyndm_sampler_nodes import RUN_TYPE
from .common import CATEGORY_ASYNDM

log = logging.getLogger(__name__)
# the longest side of a "Masks at Steps" frame, in pixels: an image's size up to 4096 px (Flux at 4 MP)
PREVIEW_SIDE = 4096


class AsynDMCurvePreview:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "steps": ("INT", {"default": 50, "min": 1, "max": 1000,
                                  "tooltip": "Steps of the plotted schedule (ignored when a run is connected)."}),
                "curve": (list(CURVE_TYPES), {"default": "bin",
                                              "tooltip": "Concave curve type (ignored when a run is connected)."}),
                "strengths": ("STRING", {"default": "0.7",
                                         "tooltip": "k of each plotted object curve, comma-separated (ignored "
                                                    "when a run is connected)."}),
            },
            "optional": {
                "run": (RUN_TYPE, {"tooltip": "A sampler's run: plot the mean timestep of the background and of "
                                              "each object's pixels of image 0 as they really moved."}),
            },
        }

    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("Timestep (up = noisy) against step: grey = background, colours = objects in target "
                       "order.",)
    FUNCTION = "plot"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = "Plot AsynDM's timestep curves: background on the usual schedule, key objects lagging behind."

    def plot(self, steps, curve, strengths, run=None):
        import torch

        from ..samplers.comfyui.previews import curves_image, mean_curves
        from ..samplers.curves import PaperCurves

        if run is not None:
            series = mean_curves(run.timestep_maps, run.masks, len(run.ks))
            return (curves_image(series, len(series), max_t=run.max_timestep),)
        ks = parse_ks(strengths) or [0.7]
        curves = PaperCurves(steps, curve=curve)  # the paper's virtual timesteps, 1001 → 0
        series = [[float(v) for v in curves.plan(None, [], 1, 1, 1)[:-1, 0, 0, 0]]]
        for k in ks:
            plan = curves.plan(torch.ones(1, 1, 1, 1), [k], 1, 1, 1)
            series.append([float(v) for v in plan[:-1, 0, 0, 0]])
        return (curves_image(series, len(series)),)


class AsynDMMaskStepsPreview:
    # The list of steps was called "steps" until it was renamed: that name means a step count
    # everywhere else, and tools that set "steps" across a graph overwrote the list. Saved UI
    # workflows keep loading because widget values are stored by position (at_steps and
    # image_index keep their places; both are optional so that they follow "run" in that order
    # while an API prompt without at_steps still validates). An API prompt that still says
    # "steps" is read through the hidden input of that name.
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "run": (RUN_TYPE, {"tooltip": "A sampler's run (dynamic masks change every step)."}),
            },
            "optional": {
                "at_steps": ("STRING", {"default": "",
                                        "tooltip": "Which steps of the run to show, comma-separated. A whole number "
                                                   "is a step (0 = first, -1 = last, -2 = the one before); a number "
                                                   "with a point is a fraction of the run (0.5 = halfway, 1.0 = "
                                                   "last). Blank: 4 evenly spaced steps. A step the run does not "
                                                   "have shows the nearest one, with a red border and a note in "
                                                   "the console."}),
                "image_index": ("INT", {"default": 0, "min": 0, "max": 4095,
                                        "tooltip": "Which image of the batch to show (past the batch: the last)."}),
            },
            "hidden": {"steps": "STRING"},
        }

    RETURN_TYPES = ("IMAGE", "IMAGE")
    RETURN_NAMES = ("regions", "timesteps")
    OUTPUT_TOOLTIPS = ("Which object owns each pixel at each chosen step (dark = background, colours = objects "
                       "in target order; red border = the nearest step to one the run does not have).",
                       "Each pixel's timestep at each chosen step (white = noisy, black = clean).")
    FUNCTION = "preview"
    CATEGORY = CATEGORY_ASYNDM
    DESCRIPTION = "Show the AsynDM masks and per-pixel timesteps at chosen steps of a run."

    @classmethod
    def VALIDATE_INPUTS(cls, at_steps=None, steps=None):
        """Checked when the prompt is queued, before anything runs: only the format, since the
        run's length is not known yet."""
        from ..samplers.comfyui.previews import parse_step_list

        try:
            parse_step_list(_step_list(at_steps, steps))
        except ValueError as e:
            return str(e)
        return True

    def preview(self, run, at_steps=None, image_index=0, steps=None):
        import torch

        from ..samplers.comfyui.previews import mark_frames, pick_steps, region_images, timestep_images

        if not run.timestep_maps:  # a pass that ran no step: nothing to show, and a preview never fails a run
            log.warning("AsynDM Masks at Steps: the run has no steps to show (a pass with start >= end)")
            blank = torch.zeros(1, 64, 64, 3)
            return blank, blank.clone()
        # latent → image pixels: the preview has the image's size, save a video's frames stacked along
        # the height, which shrink to fit PREVIEW_SIDE (an 81-frame Wan run: 21 latent frames)
        scale = getattr(run, "image_scale", 8)
        scale = max(1, min(scale, PREVIEW_SIDE // max(run.timestep_maps[0].shape[-2:])))
        chosen, clamped, notes = pick_steps(_step_list(at_steps, steps), len(run.timestep_maps))
        batch = run.timestep_maps[0].shape[0]
        if image_index >= batch:
            notes.append(f"image_index {image_index} is outside the batch of {batch}: showing image {batch - 1}")
            image_index = batch - 1
        for note in notes:
            log.warning("AsynDM Masks at Steps: %s", note)
        if all(m is None for m in run.masks):
            regions = timestep_images([t * 0 for t in run.timestep_maps], chosen, image_index, scale=scale)
        else:
            regions = region_images(run.masks, chosen, image_index, scale=scale)
        frames = [chosen.index(i) for i in clamped]
        times = timestep_images(run.timestep_maps, chosen, image_index, max_t=run.max_timestep, scale=scale)
        return mark_frames(regions, frames), mark_frames(times, frames)


def _step_list(at_steps, legacy_steps):
    """at_steps, or the list an old API prompt gives under the former name "steps"."""
    if at_steps is None and legacy_steps is not None:
        return str(legacy_steps)
    return at_steps or ""


NODE_CLASS_MAPPINGS = {
    "AsynDMCurvePreview": AsynDMCurvePreview,
    "AsynDMMaskStepsPreview": AsynDMMaskStepsPreview,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "AsynDMCurvePreview": "AsynDM Timestep Curves",
    "AsynDMMaskStepsPreview": "AsynDM Masks at Steps",
}
