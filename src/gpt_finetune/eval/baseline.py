"""The classic baseline every classification report is measured against: TF-IDF features of the
prompt (system and user messages) and a logistic regression, from scikit-learn. Multi-label data
gets one regression per label (one-vs-rest), each label predicted where its probability is over
one half; an example with none gets its most probable label, as a model always answers."""

from __future__ import annotations

from typing import Any


class TfidfBaseline:
    name = "tfidf+logreg"

    def __init__(self, *, seed: int = 0) -> None:
        self.seed = seed
        self.model: Any = None
        self.binarizer: Any = None
        self.multi = False

    def fit(self, prompts: list[str], labels: list[list[str]], label_set: list[str]) -> TfidfBaseline:
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.linear_model import LogisticRegression
        from sklearn.multiclass import OneVsRestClassifier
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import MultiLabelBinarizer

        self.multi = any(len(x) > 1 for x in labels)
        features = TfidfVectorizer(sublinear_tf=True, ngram_range=(1, 2), min_df=1, max_features=200_000)
        regression = LogisticRegression(max_iter=2000, C=10.0, random_state=self.seed)
        if self.multi:
            self.binarizer = MultiLabelBinarizer(classes=label_set)
            self.model = make_pipeline(features, OneVsRestClassifier(regression))
            self.model.fit(prompts, self.binarizer.fit_transform(labels))
        else:
            self.model = make_pipeline(features, regression)
            self.model.fit(prompts, [x[0] for x in labels])
        return self

    def predict(self, prompts: list[str]) -> list[list[str]]:
        if not self.multi:
            return [[str(y)] for y in self.model.predict(prompts)]
        probs = self.model.predict_proba(prompts)
        classes = list(self.binarizer.classes_)
        out = []
        for row in probs:
            chosen = [classes[i] for i, p in enumerate(row) if p > 0.5]
            out.append(chosen or [classes[int(row.argmax())]])
        return out
