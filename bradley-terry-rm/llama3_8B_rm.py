"""Upstream's script name: train.py with configs/llama3-8b-it.yaml (Meta-Llama-3-8B-Instruct, upstream's values) as the
recipe; a recipe or --config on the command line replaces it, and every flag overrides it.

    accelerate launch bradley-terry-rm/llama3_8B_rm.py --deepspeed deepspeed_configs/deepspeed_3.json
"""

# Run as a script, this folder is sys.path[0] (under every launcher too), so train.py imports as `train`; the
# folder's name has a hyphen, so it is no package.
from train import run_with_recipe

if __name__ == "__main__":
    run_with_recipe("llama3-8b-it.yaml")
