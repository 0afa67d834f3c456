"""--push_to_hub for the trainers: the final, verified checkpoint goes to the Hugging Face Hub once the run is
published, and nothing before.

Why not the Trainer's own push: it creates the repository when the Trainer is built (a network error before any
work), pushes the whole output directory at every save, before the reload check, and with last_checkpoint/ as a
sub-folder, so that from_pretrained(repo) would find no model at the repository's root."""

from pathlib import Path

from useful_code.cli import UserError


class FinalCheckpointPush:
    """Mixin for TrainingArguments subclasses, listed first: --push_to_hub (with transformers' --hub_model_id,
    --hub_private_repo, --hub_token, --hub_revision) is kept as push_final_checkpoint and turned off for the Trainer;
    the script calls push_checkpoint after publishing the run."""

    def __post_init__(self):
        super().__post_init__()
        self.push_final_checkpoint, self.push_to_hub = self.push_to_hub, False
        strategy = getattr(self.hub_strategy, "value", self.hub_strategy)
        if self.push_final_checkpoint and (strategy != "every_save" or self.hub_always_push):
            print(f"note: --hub_strategy {strategy}{' and --hub_always_push' if self.hub_always_push else ''} not "
                  "used: only the final, verified checkpoint is pushed")


def hub_repo_id(args) -> str:
    """--hub_model_id, else the output directory's name (the Trainer's default)."""
    return args.hub_model_id or Path(args.output_dir).resolve().name


def push_checkpoint(args, checkpoint_dir: str) -> str:
    """Upload checkpoint_dir's files to the root of the Hub repository (created if missing, private with
    --hub_private_repo); returns the repository's URL. A failure (network, authentication, permissions) is one line
    that says the run itself is complete and how to upload it later."""
    from huggingface_hub import HfApi

    repo_id = hub_repo_id(args)
    api = HfApi(token=args.hub_token)
    try:
        repo = api.create_repo(repo_id, private=args.hub_private_repo, exist_ok=True)
        if args.hub_revision:  # upload_folder needs the branch to exist
            api.create_branch(repo.repo_id, branch=args.hub_revision, exist_ok=True)
        api.upload_folder(repo_id=repo.repo_id, folder_path=checkpoint_dir, revision=args.hub_revision,
                          commit_message="Upload reward model")
    except Exception as err:  # huggingface_hub's HTTP errors, requests/httpx connection errors, OSError
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        # The same repository settings, or hf upload would make a repository meant to be private public.
        options = "".join(f" {option}" for option, given in (
            ("--private", args.hub_private_repo), (f"--revision {args.hub_revision}", args.hub_revision)) if given)
        later = f"hf upload {repo_id} {checkpoint_dir} .{options}"
        raise UserError(f"--push_to_hub: uploading {checkpoint_dir} to {repo_id} failed ({reason}); the run is "
                        f"complete there: upload it later with `{later}`") from None
    return repo.url
