"""Pieces shared by the `hf-fs` commands (`cli.py`, `cli_build.py`): option types and groups (`options`) and the
model / image-source loading behind `--model`, `--booster`, `--images` and `--dataset` (`loading`). The commands
import these modules; these modules never import the commands."""
