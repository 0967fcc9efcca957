"""Text augmentations on a caption's words (whitespace-split): stop-word removal and the four EDA operations
(Wei & Zou 2019), every random choice drawn from a torch generator so a view is a function of its seed.

A word is compared by its key: lower case, without the punctuation around it ("Dog," -> "dog"); a word
that is replaced keeps that punctuation.
"""
from __future__ import annotations

import string

import torch

from vlpt.data.thesaurus import WordNet

# English function words: articles, determiners, pronouns, auxiliaries, prepositions, conjunctions and the
# commonest adverbs; what NLTK's English list (which clip-rocket uses) covers, written out here
STOPWORDS = frozenset("""
a an the this that these those each every some any all both either neither no nor not only own same such
few more most other several much many
i me my mine myself we us our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves
what which who whom whose whoever whatever
am is are was were be been being have has had having do does did doing done will would shall should can
could may might must ought
about above across after against along among around at before behind below beneath beside besides between
beyond by down during except for from in inside into near of off on onto out outside over past per since
through throughout till to toward towards under underneath until up upon via with within without
and but or so yet if then than because as while whereas although though whether once unless
here there when where why how very too just also again further now ever
""".split())


def key(word: str) -> str:
    return word.strip(string.punctuation).lower()


def _n(strength: float, words: list[str]) -> int:
    """EDA's count of changes: max(1, int(alpha * words))."""
    return max(1, int(strength * len(words)))


def _randint(n: int, g: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=g))


def remove_stopwords(words: list[str]) -> list[str]:
    """The words that are not stop words (nor bare punctuation); all of them if nothing would be left."""
    kept = [w for w in words if key(w) and key(w) not in STOPWORDS]
    return kept or list(words)


def _respell(word: str, new: str) -> str:
    """`new` in place of `word`'s letters, keeping the punctuation around them."""
    k = word.strip(string.punctuation)
    start = word.find(k)
    return word[:start] + new + word[start + len(k):]


def synonym_replacement(words: list[str], strength: float, g: torch.Generator, wordnet: WordNet) -> list[str]:
    """EDA's SR: n distinct non-stop words, tried in a random order, each replaced everywhere it occurs by
    one of its synonyms drawn at random; words without synonyms are skipped."""
    candidates = sorted({key(w) for w in words if key(w) and key(w) not in STOPWORDS})
    n, done, words = _n(strength, words), 0, list(words)
    for i in torch.randperm(len(candidates), generator=g).tolist():
        synonyms = wordnet.synonyms(candidates[i])
        if not synonyms:
            continue
        new = synonyms[_randint(len(synonyms), g)]
        words = [_respell(w, new) if key(w) == candidates[i] else w for w in words]
        done += 1
        if done == n:
            break
    return words


def random_insertion(words: list[str], strength: float, g: torch.Generator, wordnet: WordNet,
                     tries: int = 10) -> list[str]:
    """EDA's RI: n times, a synonym of a random non-stop word inserted at a random position (a word without
    synonyms is redrawn, up to `tries` times, then that insertion is skipped)."""
    candidates = [key(w) for w in words if key(w) and key(w) not in STOPWORDS]
    words = list(words)
    for _ in range(_n(strength, words) if candidates else 0):
        for _ in range(tries):
            synonyms = wordnet.synonyms(candidates[_randint(len(candidates), g)])
            if synonyms:
                words.insert(_randint(len(words) + 1, g), synonyms[_randint(len(synonyms), g)])
                break
    return words


def random_swap(words: list[str], strength: float, g: torch.Generator) -> list[str]:
    """EDA's RS: n times, two random positions exchange their words."""
    words = list(words)
    if strength <= 0 or len(words) < 2:
        return words
    for _ in range(_n(strength, words)):
        i, j = torch.randint(len(words), (2,), generator=g).tolist()
        words[i], words[j] = words[j], words[i]
    return words


def random_deletion(words: list[str], p: float, g: torch.Generator) -> list[str]:
    """EDA's RD: each word goes with probability p; one random word stays if none would."""
    if p <= 0 or not words:
        return list(words)
    drop = (torch.rand(len(words), generator=g) < p).tolist()
    kept = [w for w, d in zip(words, drop) if not d]
    return kept or [words[_randint(len(words), g)]]
