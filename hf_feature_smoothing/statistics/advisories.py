"""Known defects of released versions that invalidate stored certificates. A certificate records the library version,
the bound and its sample count, so whether it must be recomputed is decided from the record alone. Pure: stdlib
only."""

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Advisory:
    """
    A defect of released versions and the certificates it affects.

    Args:
        name (`str`): short identifier, e.g. `"betting-carry"`.
        versions (`tuple[str, ...]`): the `hf_feature_smoothing` versions that have it.
        fixed_in (`str`): the first version without it.
        bound (`str`): the confidence bound it affects.
        max_valid_samples (`int`): certificates whose bound used at most this many samples are unaffected.
        summary (`str`): what was wrong and what to do, for warnings.
    """

    name: str
    versions: tuple[str, ...]
    fixed_in: str
    bound: str
    max_valid_samples: int
    summary: str

    def affects(self, record: Mapping) -> bool:
        """Whether a certificate record (`FeatureCertificate.to_dict()`, `PredictionCertificate.to_dict()` or a run
        row) is affected: made by an affected version, with this bound, from more than `max_valid_samples`
        samples (`n_used` where recorded, a sequential run's actual count, else `n`)."""
        version = (record.get("versions") or {}).get("hf_feature_smoothing")
        samples = record.get("n_used") or record.get("n") or 0
        return version in self.versions and record.get("bound") == self.bound and samples > self.max_valid_samples


BETTING_CARRY = Advisory(
    name="betting-carry",
    versions=("0.1.0",),
    fixed_in="0.2.0",
    bound="betting",
    max_valid_samples=4096,
    summary="hf_feature_smoothing 0.1.0 over-stated betting bounds computed from more than 4096 samples (the capital "
            "carried between blocks of 4096 scores was corrupted), so these certificates may claim more than holds; "
            "recompute them with >= 0.2.0 (`hf-fs certify ... --overwrite`). Bounds from <= 4096 samples, and "
            "Bernstein / Hoeffding bounds, are unaffected.",
)
ADVISORIES = (BETTING_CARRY,)


def advisories_for(record: Mapping) -> list[Advisory]:
    """The known defects that affect a certificate record (empty when it is sound as far as is known)."""
    return [advisory for advisory in ADVISORIES if advisory.affects(record)]
