"""Config side of the smoothed model types: `feature_smoothing` holds the live `FeatureSmoothingConfig`."""

from ..smoothing.configuration_feature_smoothing import FeatureSmoothingConfig


class SmoothedConfigMixin:
    """
    Mixed into the `Smoothed*Config` classes. `config.feature_smoothing` is a [`FeatureSmoothingConfig`] (the very
    object the model's `smoothing_config` and `smoothed_vision_tower.config` are), serialised as a dict in
    `config.json`. Assigning a dict or config to `feature_smoothing` updates that object in place, so every holder
    sees the change.
    """

    def __setattr__(self, key, value):
        if key == "feature_smoothing":
            current = self.__dict__.get("feature_smoothing")
            if value is None and current is None:
                pass
            elif isinstance(current, FeatureSmoothingConfig):
                new = FeatureSmoothingConfig() if value is None else FeatureSmoothingConfig.from_dict(value)
                if new is not current:
                    current.update(new)
                value = current
            else:
                value = FeatureSmoothingConfig.from_dict(value)
        super().__setattr__(key, value)

    def to_dict(self) -> dict:
        output = super().to_dict()
        if isinstance(output.get("feature_smoothing"), FeatureSmoothingConfig):
            output["feature_smoothing"] = output["feature_smoothing"].to_dict()
        return output
