"""What the DreamBooth scripts share, one room per concern; each script in `train_scripts/` is a short
reading of its diffusers original that picks from here what it needs.

    flags         the shared command-line flags and their checks; the adapter config they ask for
    data          images, captions, the DreamBooth data set, generated class images
    run           accelerator, models with adapters, optimizer, data loader, lr scheduler
    losses        what a model learns to predict and the loss on it (DDPM noise / velocity, min-SNR)
    checkpoints   atomic, pickle-free checkpoints that resume a run exactly
    loop          the training loop, validation images, the final save
    model_card    the README.md left in the output folder
    flow          flow matching (Flux, SD3): timestep densities, noisy latents, loss weightings
    prompts       prompt encodings of the CLIP + T5 families, cached where nothing trains
    sharding      what saving and resuming need under Accelerate's FSDP2
    sd, sdxl,     what is particular to a model family: how its prompts are encoded, how it is conditioned,
    flux, sd3     how its latents are laid out

Random crops, flips and the data order are functions of (seed, epoch, index), and checkpoints hold every
process's random states, so a resumed run takes the same steps as one that was never interrupted.

Needs the `train` extra (accelerate's trackers use tensorboard by default).
"""

from .checkpoints import (
    CHECKPOINT_RE,
    RANDOM_STATES,
    TRAINING_STATE,
    checkpoint_steps,
    find_checkpoint,
    load_adapters_in_place,
    load_state_file,
    load_training_state,
    random_states,
    save_checkpoint,
    save_state_file,
    save_training_state,
    set_random_states,
)
from .data import (
    INTERPOLATION,
    METADATA,
    DatasetImages,
    DreamBoothDataset,
    ImageSet,
    caption_files,
    caption_images,
    collate_fn,
    fast_sampler,
    generate_class_images,
    list_images,
    load_rgb,
    metadata_captions,
    sidecar_caption,
    text_image_data,
)
from .errors import DivergedError, TrainingError
from .flags import adapter_config, add_shared_arguments, add_transformer_arguments, check_args
from .loop import finish_training, log_validation, train_loop
from .losses import denoising_loss, noise_target, training_noise
from .model_card import ModelFamily, save_model_card
from .run import (
    add_adapters,
    build_dataloader,
    build_lr_scheduler,
    build_optimizer,
    load_model,
    load_script,
    load_text_encoder,
    start_run,
    weight_dtype_of,
)

__all__ = [
    "adapter_config",
    "add_adapters",
    "add_shared_arguments",
    "add_transformer_arguments",
    "build_dataloader",
    "build_lr_scheduler",
    "build_optimizer",
    "caption_files",
    "caption_images",
    "check_args",
    "CHECKPOINT_RE",
    "checkpoint_steps",
    "collate_fn",
    "denoising_loss",
    "DatasetImages",
    "DreamBoothDataset",
    "fast_sampler",
    "find_checkpoint",
    "finish_training",
    "generate_class_images",
    "ImageSet",
    "INTERPOLATION",
    "list_images",
    "load_adapters_in_place",
    "load_model",
    "load_script",
    "load_rgb",
    "load_state_file",
    "load_text_encoder",
    "load_training_state",
    "log_validation",
    "METADATA",
    "metadata_captions",
    "ModelFamily",
    "noise_target",
    "RANDOM_STATES",
    "random_states",
    "save_checkpoint",
    "save_model_card",
    "save_state_file",
    "save_training_state",
    "set_random_states",
    "sidecar_caption",
    "start_run",
    "train_loop",
    "TRAINING_STATE",
    "training_noise",
    "text_image_data",
    "DivergedError",
    "TrainingError",
    "weight_dtype_of",
]
