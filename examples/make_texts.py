"""Write examples/texts.jsonl: a few hundred short notes in four domains, with restatements.

Each domain (the default model's constellations: mathematics, language, vision, memory) has
25 notes written for this project. Every note appears once as written and twice restated
(a prefix and a suffix a note-taker might add), so the librarian has near-duplicates to merge
and distinct notes to keep apart. Deterministic: ``python examples/make_texts.py``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NOTES = {
    "mathematics": [
        "The derivative measures how fast a function changes at a point.",
        "An integral adds up infinitely many thin slices of area.",
        "A prime number has exactly two positive divisors.",
        "Every whole number above one factors into primes in one way only.",
        "The square root of two cannot be written as a ratio of integers.",
        "A matrix multiplied by its inverse gives the identity matrix.",
        "Eigenvectors keep their direction when a linear map is applied.",
        "The sum of the angles of a triangle in the plane is half a turn.",
        "A geometric series with ratio below one converges to a finite sum.",
        "Probability of independent events multiplies.",
        "The mean of a sample estimates the mean of its population.",
        "Variance measures how widely values spread around their mean.",
        "A proof by induction checks a base case and then a step.",
        "The Pythagorean theorem relates the sides of a right triangle.",
        "Logarithms turn multiplication into addition.",
        "A function is continuous when small input changes give small output changes.",
        "The exponential function is its own derivative.",
        "Complex numbers add a square root of minus one to the reals.",
        "A graph in mathematics is a set of vertices joined by edges.",
        "Modular arithmetic wraps numbers around a fixed modulus like a clock.",
        "The dot product of perpendicular vectors is zero.",
        "A convex function lies below the chord between any two of its points.",
        "Gradient descent steps against the gradient to lower a loss.",
        "The binomial coefficient counts ways to choose items without order.",
        "A limit describes the value a sequence approaches.",
    ],
    "language": [
        "A verb agrees with its subject in person and number.",
        "A metaphor describes one thing as if it were another.",
        "Morphemes are the smallest units of meaning in a word.",
        "Word order carries grammatical meaning in English.",
        "A pronoun stands in for a noun mentioned before.",
        "Idioms mean more than the sum of their words.",
        "Tone of voice can reverse the meaning of a sentence.",
        "A dialect is a regional or social variety of a language.",
        "Children acquire the grammar of their first language without lessons.",
        "Loanwords enter a language through contact with another.",
        "A sentence can be ambiguous when it parses in two ways.",
        "Phonemes are the sounds a language uses to tell words apart.",
        "Tokenizers split text into pieces a model can count.",
        "Synonyms share a meaning but rarely every shade of it.",
        "A clause contains a subject and a predicate.",
        "Punctuation marks the rhythm and structure of written sentences.",
        "Irony says one thing and means its opposite.",
        "Translation must carry meaning, not only words, across languages.",
        "The passive voice puts the object of an action first.",
        "A paragraph develops one main idea.",
        "Spelling often preserves pronunciations that have since changed.",
        "A question can be marked by rising intonation alone.",
        "Context resolves which sense of a polysemous word is meant.",
        "Alliteration repeats the first sound of neighbouring words.",
        "A summary keeps the main points and drops the details.",
    ],
    "vision": [
        "Edges in an image mark sharp changes in brightness.",
        "A convolution slides a small filter across an image.",
        "Colour images store red, green and blue channels per pixel.",
        "Pooling shrinks a feature map while keeping strong responses.",
        "Object detection draws boxes around things in a picture.",
        "Segmentation labels every pixel with the object it belongs to.",
        "Optical flow estimates how pixels move between video frames.",
        "Stereo vision recovers depth from two offset views.",
        "Data augmentation flips and crops images to enlarge a training set.",
        "A histogram of pixel intensities summarises an image's exposure.",
        "Blurring an image averages each pixel with its neighbours.",
        "Feature descriptors let the same point be matched across photos.",
        "The retina turns light into signals for the brain.",
        "Peripheral vision is sensitive to motion but poor at detail.",
        "Contrast makes an object stand out from its background.",
        "Vision transformers cut an image into patches treated as tokens.",
        "Camera lenses bend light to focus it on a sensor.",
        "Image compression discards detail the eye hardly notices.",
        "Occlusion hides part of an object behind another.",
        "Texture describes the repeated small-scale pattern of a surface.",
        "A heat map colours an image by how much each region mattered.",
        "Face recognition compares embeddings of aligned face crops.",
        "Low light forces a camera to trade noise against blur.",
        "Perspective makes parallel lines meet at a vanishing point.",
        "Thresholding turns a greyscale image into black and white.",
    ],
    "memory": [
        "Rehearsal moves facts from short-term into long-term memory.",
        "Short-term memory holds only a handful of items at once.",
        "Sleep helps consolidate what was learned during the day.",
        "Spaced repetition reviews material just before it is forgotten.",
        "Retrieval practice strengthens memories more than rereading.",
        "The forgetting curve falls steeply at first and then levels off.",
        "Chunking groups items so more fit in working memory.",
        "Emotional events are remembered more vividly.",
        "Context at recall that matches context at learning aids memory.",
        "Episodic memory stores personal events in time and place.",
        "Semantic memory stores facts independent of when they were learned.",
        "Procedural memory holds skills such as riding a bicycle.",
        "Interference from similar material causes forgetting.",
        "The hippocampus is central to forming new long-term memories.",
        "A cache keeps recently used data close at hand.",
        "Mnemonics attach new facts to vivid images or rhymes.",
        "Memories are reconstructed each time they are recalled.",
        "Attention decides what enters memory in the first place.",
        "Testing yourself reveals what you have not yet learned.",
        "Interleaving topics improves long-term retention.",
        "Working memory is where reasoning manipulates information.",
        "False memories can feel as certain as true ones.",
        "The serial position effect favours the first and last items of a list.",
        "Stress hormones can both sharpen and impair recall.",
        "Writing notes by hand encourages summarising and better recall.",
    ],
}

PREFIXES = ["Note: ", "Key point: ", "Remember that ", "From the lecture: "]
SUFFIXES = [" This came up twice.", " Worth reviewing.", " (from the reading)",
            " See the chapter summary."]


def restate(note: str, rng: random.Random) -> tuple[str, str]:
    lowered = note[0].lower() + note[1:]
    prefix = rng.choice(PREFIXES)
    first = prefix + (lowered if prefix.endswith(("that ", ": ")) else note)
    return first, note + rng.choice(SUFFIXES)


def main() -> None:
    rng = random.Random(7)
    lines = []
    for domain, notes in NOTES.items():
        for n, note in enumerate(notes):
            first, second = restate(note, rng)
            for variant, text in enumerate((note, first, second)):
                lines.append({"id": f"{domain}-{n:02d}-{variant}", "text": text,
                              "meta": {"domain": domain}})
    rng.shuffle(lines)
    out = Path(__file__).with_name("texts.jsonl")
    out.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    print(f"wrote {len(lines)} items to {out}")


if __name__ == "__main__":
    main()
