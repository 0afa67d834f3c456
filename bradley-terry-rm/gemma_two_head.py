"""Upstream's ODIN script name (its odin/README.md runs ./bradley-terry-rm/gemma_two_head.py): train.py with
configs/gemma-two-head-odin.yaml (--loss_type odin, upstream's values) as the recipe; a recipe or --config on the
command line replaces it, and every flag overrides it. Upstream's --correlation_with_length and --ortho_reg are
this trainer's --odin_length_coefficient and --odin_ortho_coefficient.

    accelerate launch bradley-terry-rm/gemma_two_head.py --model_name google/gemma-2-9b-it --max_length 2048 \\
        --train_set_path hendrydong/preference_700K --output_path ./gemma_9b_700K_v2 \\
        --deepspeed deepspeed_configs/deepspeed_2.json --per_device_train_batch_size 16
"""

# Run as a script, this folder is sys.path[0] (under every launcher too), so train.py imports as `train`; the
# folder's name has a hyphen, so it is no package.
from train import run_with_recipe

if __name__ == "__main__":
    run_with_recipe("gemma-two-head-odin.yaml")
