"""FPDM: fixed point diffusion models (and plain DiT), for ComfyUI and the command line.

model.py      the network (reference architecture; sin-cos position embedding for any grid);
              explicit forward ``solve`` (solver in, output + solution + counts out); size table,
              label dropout and DiT initialisation for training
loading.py    safe checkpoint loading and architecture inference
solver.py     iteration allocation, the fixed-point solver (tolerance, Anderson), per-run reuse
              state, the stochastic training solver
diffusion.py  schedules, DDPM / DDIM steps (learned variance, v-prediction, zero-SNR, guidance),
              q_sample and the training losses: one module for every sampling and training path
pipeline.py   class-conditional sampling loop (CLI, tests, benchmarks)
comfy_model.py / comfy_sampler.py   the ComfyUI MODEL and SAMPLER (imported only inside ComfyUI)
cli.py        ``python -m asyndm_fpdm fpdm``

Nothing is imported here, so importing the pack stays cheap.
"""
