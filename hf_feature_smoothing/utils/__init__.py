"""The bottom layer (L0): utilities every other part may import and that import no other part of the package
(`errors`: the run error type; `locking`: exclusive, non-blocking file locks and the one lock-path convention;
`atomic`: atomic files and folders)."""
