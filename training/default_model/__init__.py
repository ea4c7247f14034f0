"""Recipe for the shipped default model, ``tiny-shapes``, trained from scratch on procedural shapes.

Stages, each an Accelerate run with seeded data, checkpoints and ``--resume latest``::

    python -m training.default_model vae        # 1. KL autoencoder, f=8, 4 latent channels
    python -m training.default_model clip       # 2. CLIP text encoder (+ image tower for scores)
    python -m training.default_model unet       # 3. UNet on precomputed latents, 10% empty captions
    python -m training.default_model assemble   # 4. weights/tiny-shapes.safetensors + config
    python -m training.default_model all        # 1–4 in one go

``accelerate launch -m training.default_model <stage> ...`` runs a stage on several processes.
"""
