"""A linear reference for the notes task: pooled TF-IDF + logistic regression (scikit-learn).

    python -m simulations.benchmarks.text_reference [overrides, e.g. num_hospitals=4 seed=0]

Trained on the raw note texts of every site's training split pooled, evaluated on every site's
test split pooled, with the rows and splits the sites' loaders use (``read_site_notes``). It is
what a federated notes model should approach: no federation, no privacy, no hashing, the whole
note (the models see the first ``task.spec.max_len`` words). Not shipped as a model: pooling the
notes is exactly what hospitals cannot do.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from client.evaluation import classification_metrics
from client.tasks.notes import note_words, read_site_notes

# Regularisation strengths tried by 5-fold cross-validation on the pooled training notes.
C_GRID = (0.3, 1.0, 3.0, 10.0, 30.0)


def tfidf_logreg_reference(cfg: Mapping[str, Any],
                           folders: Mapping[str, Path]) -> dict[str, float]:
    """The project's metrics (client.evaluation) of TF-IDF (words + bigrams, sublinear tf)
    and logistic regression, trained on all sites' training notes, on all sites' test notes."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.pipeline import make_pipeline

    task_cfg = cfg["task"]
    num_classes = int(task_cfg["spec"]["num_classes"])
    train_texts, train_labels, test_texts, test_labels = [], [], [], []
    for site, folder in folders.items():
        notes = read_site_notes(folder, task_cfg, site)
        train_texts += notes.train_texts
        train_labels += notes.train_labels
        test_texts += notes.test_texts
        test_labels += notes.test_labels
    pipeline = make_pipeline(
        # the loader's own word rule, so the reference and the models split text alike
        TfidfVectorizer(tokenizer=note_words, lowercase=False, token_pattern=None,
                        ngram_range=(1, 2), min_df=2, sublinear_tf=True),
        LogisticRegressionCV(Cs=list(C_GRID), l1_ratios=(0.0,), cv=5, max_iter=2000,
                             scoring="neg_log_loss", use_legacy_attributes=False),  # L2
    )
    pipeline.fit(train_texts, np.asarray(train_labels))
    probs = np.zeros((len(test_texts), num_classes))
    # classes absent from the pooled training notes keep probability 0
    probs[:, pipeline.classes_] = pipeline.predict_proba(test_texts)
    return classification_metrics(np.asarray(test_labels, dtype=np.int64), probs, num_classes)


def main(argv: list[str]) -> None:
    from server.settings import compose
    from simulations.sites import site_folders

    cfg = compose(["task=notes", *argv])
    print(json.dumps(tfidf_logreg_reference(cfg, site_folders(cfg)), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
