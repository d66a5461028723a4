"""The official Python tutorial as a second real document for `memlm bench realdoc`, beside the
Vim manual: the HTML chapters of Debian's package `python3.11-doc`, read where it is installed,
else downloaded with apt at benchmark time and converted to plain text (never committed).

All sixteen chapters, in the tutorial's order and under its own numbers, make 229,654
characters: 62,639 tokens of the embedded model's tokenizer (3.67 characters a token; the
code examples tokenize denser than the prose). Where the Vim manual is terse reference prose
about keys, the tutorial explains a language in long paragraphs between code examples, and
names many things that look alike (dozens of modules, methods and keywords), so a read must
find the one paragraph a question needs among many about the same subject.

Half the questions are paraphrased: they share no content word with the sentence that states
their answer (`content_words`), so only a read that finds passages by meaning brings it; the
other half repeat a rare word of it, as most users' first questions do.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from bs4 import BeautifulSoup

from memlm.bench.realdoc import Question, RealDocument, package_files

PACKAGE = "python3.11-doc"
TUTORIAL_DIRS = "/usr/share/doc/python3.11/html/tutorial"  # where python3.11-doc installs it (a glob)
# The tutorial's chapters in its own order: chapter n of the document is the tutorial's chapter n.
CHAPTERS: tuple[str, ...] = (
    "appetite.html",  # 1. Whetting Your Appetite
    "interpreter.html",  # 2. Using the Python Interpreter
    "introduction.html",  # 3. An Informal Introduction to Python
    "controlflow.html",  # 4. More Control Flow Tools
    "datastructures.html",  # 5. Data Structures
    "modules.html",  # 6. Modules
    "inputoutput.html",  # 7. Input and Output
    "errors.html",  # 8. Errors and Exceptions
    "classes.html",  # 9. Classes
    "stdlib.html",  # 10. Brief Tour of the Standard Library
    "stdlib2.html",  # 11. Brief Tour of the Standard Library, Part II
    "venv.html",  # 12. Virtual Environments and Packages
    "whatnow.html",  # 13. What Now?
    "interactive.html",  # 14. Interactive Input Editing and History Substitution
    "floatingpoint.html",  # 15. Floating Point Arithmetic: Issues and Limitations
    "appendix.html",  # 16. Appendix
)
# Elements that end a line of text: without a break after them the converted text would run
# a paragraph into the next heading or list item.
_BLOCKS = ("p", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "li", "dt", "dd", "tr", "blockquote")

# Words that any question shares with any sentence; every other word of three letters or more
# is a content word (see `content_words`).
STOPWORDS = frozenset(
    "the and but nor not yet for with without from into onto upon out off over under about above "
    "below after before between through during since until than then there here when where while "
    "which what who whom whose why how does did doing done has have had having was were are been "
    "being can could would should will shall may might must its his her hers him she they them "
    "their theirs you your yours our ours itself myself yourself themselves this that these those "
    "all any some each every both either neither such other another same more most much many few "
    "also just only very too own like one ones".split()
)


def _stem(word: str) -> str:
    """Crude: strip -ing, -ed, -es, -s (repeatedly) and a final -e, so "sorted" and "sort",
    "loops" and "loop", "uses" and "used" meet. It overreaches ("string" and "str" meet too),
    which errs on the strict side for a paraphrase: two words only ever look more alike."""
    while True:
        suffix = next((s for s in ("ing", "ed", "es", "s") if word.endswith(s) and len(word) - len(s) >= 2), None)
        if suffix is None or word.endswith("ss"):
            break
        word = word[: -len(suffix)]
    return word[:-1] if word.endswith("e") and len(word) > 2 else word


def content_words(text: str) -> set[str]:
    """Stems of the words of three or more letters that are not STOPWORDS, case aside."""
    return {_stem(w) for w in re.findall(r"[^\W\d_]+", text.lower()) if len(w) >= 3 and w not in STOPWORDS}


# Written for the Python 3.11 tutorial (python3.11-doc 3.11.2); every anchor is checked
# against the converted text by tests/test_realdoc.py. Anchors are whole sentences where
# that is short enough, so that no content word of the sentence a read brings is left
# unchecked; answers are things the scorer can match whole-word (a keyword, a name, a number).
QUESTIONS: tuple[Question, ...] = (
    Question("Rather than curly braces, what shows which lines of code belong together as one block?",
             "indentation", "statement grouping is done by indentation instead of beginning and ending brackets;",
             1, paraphrased=True),
    Question("Which BBC show is Python named after?", "Monty Python",
             "By the way, the language is named after the BBC show “Monty Python’s Flying Circus” and has "
             "nothing to do with reptiles.", 1, variants=("Flying Circus",)),
    Question("Which command-line option runs a script and then enters interactive mode afterwards?", "-i",
             "When a script file is used, it is sometimes useful to be able to run the script and enter "
             "interactive mode afterwards. This can be done by passing -i before the script.", 2),
    Question("Which character set is assumed for a script's text when none is declared?", "UTF-8",
             "By default, Python source files are treated as encoded in UTF-8.", 2,
             variants=("utf8",), paraphrased=True),
    Question("Which symbol do I put in front of a note in my code so the interpreter ignores it?", "#",
             "Comments in Python start with the hash character, #, and extend to the end of the physical line.",
             3, variants=("hash",), paraphrased=True),
    Question("Which suffix marks the imaginary part of a complex number?", "j",
             "Python also has built-in support for complex numbers, and uses the j or J suffix to indicate "
             "the imaginary part (e.g. 3+5j).", 3),
    Question("Which keyword is short for 'else if'?", "elif",
             "The keyword ‘elif’ is short for ‘else if’, and is useful to avoid excessive indentation.", 4),
    Question("Which keyword exits a repetition early, before it would normally finish?", "break",
             "The break statement, like in C, breaks out of the innermost enclosing for or while loop.", 4,
             distractors=("continue",), paraphrased=True),
    Question("Which reserved word gives you a nameless one-expression callable?", "lambda",
             "Small anonymous functions can be created with the lambda keyword.", 4, paraphrased=True),
    Question("In which attribute of a function are its annotations stored?", "__annotations__",
             "Annotations are stored in the __annotations__ attribute of the function as a dictionary and "
             "have no effect on any other part of the function.", 4),
    Question("A plain list is slow when I keep removing its front element; which container from the "
             "standard library fixes that?", "deque",
             "To implement a queue, use collections.deque which was designed to have fast appends and pops "
             "from both ends.", 5, paraphrased=True),
    Question("Which operator lets you do assignment inside an expression?", "walrus",
             "Note that in Python, unlike C, assignment inside expressions must be done explicitly with the "
             "walrus operator :=.", 5, variants=(":=",)),
    Question("Which folder keeps bytecode copies of imported code so it starts faster next time?",
             "__pycache__", "To speed up loading modules, Python caches the compiled version of each module in the "
             "__pycache__ directory under the name module.version.pyc, where the version encodes the format of "
             "the compiled file; it generally contains the Python version number.", 6, paraphrased=True),
    Question("Which file is required to make Python treat a directory as a package?", "__init__.py",
             "The __init__.py files are required to make Python treat directories containing the file as "
             "packages.", 6),
    Question("Which method right-justifies a string in a field of a given width?", "rjust",
             "The str.rjust() method of string objects right-justifies a string in a field of a given width "
             "by padding it with spaces on the left.", 7, distractors=("ljust", "center")),
    Question("Which call adds leading 0s so that 12 is shown as 00012?", "zfill",
             "There is another method, str.zfill(), which pads a numeric string on the left with zeros.", 7,
             paraphrased=True),
    Question("What gets thrown when someone hits Ctrl-C to stop a running script?", "KeyboardInterrupt",
             "Look at the following example, which asks the user for input until a valid integer has been "
             "entered, but allows the user to interrupt the program (using Control-C or whatever the "
             "operating system supports); note that a user-generated interruption is signalled by raising "
             "the KeyboardInterrupt exception.", 8, paraphrased=True),
    Question("Which method accepts a string and adds it to the exception's notes list?", "add_note",
             "For this purpose, exceptions have a method add_note(note) that accepts a string and adds it to "
             "the exception’s notes list.", 8),
    Question("What is the customary name for the parameter that refers to the instance itself?", "self",
             "Often, the first argument of a method is called self.", 9, paraphrased=True),
    Question("What is the limited support for class-private members called?", "name mangling",
             "Since there is a valid use-case for class-private members (namely to avoid name clashes of "
             "names with names defined by subclasses), there is limited support for such a mechanism, called "
             "name mangling.", 9, variants=("mangling",)),
    Question("In a generator, which keyword hands back each value while pausing?", "yield",
             "They are written like regular functions but use the yield statement whenever they want to "
             "return data.", 9, paraphrased=True),
    Question("Which module provides a more sophisticated mechanism to process command line arguments?",
             "argparse", "The argparse module provides a more sophisticated mechanism to process command line "
             "arguments.", 10, distractors=("argv",)),
    Question("Which library checks the examples written inside the documentation comments of functions?",
             "doctest", "The doctest module provides a tool for scanning a module and validating tests embedded "
             "in a program’s docstrings.", 10, distractors=("unittest",), paraphrased=True),
    Question("Which module provides tools for tracking objects without creating a reference?", "weakref",
             "The weakref module provides tools for tracking objects without creating a reference.", 11),
    Question("Which library gives a priority queue where the smallest item always comes out first?", "heapq",
             "The heapq module provides functions for implementing heaps based on regular lists.", 11,
             paraphrased=True),
    Question("How do I turn off the isolated Python setup I switched on earlier?",
             "deactivate", "To deactivate a virtual environment, type: deactivate into the terminal.", 12,
             paraphrased=True),
    Question("By convention, in which file do you put the list produced by pip freeze?", "requirements.txt",
             "A common convention is to put this list in a requirements.txt file:", 12),
    Question("What was the Python Package Index previously nicknamed?", "Cheese Shop",
             "The Python Package Index, previously also nicknamed the Cheese Shop [1], is an index of "
             "user-created Python modules that are available for download.", 13),
    Question("Where are the lines I typed at the prompt kept between sessions?", ".python_history",
             "The default configuration also saves your history into a file named .python_history in your "
             "user directory.", 14, variants=("python_history",), paraphrased=True),
    Question("Which enhanced interactive interpreter features tab completion and advanced history management?",
             "IPython", "One alternative enhanced interactive interpreter that has been around for quite some "
             "time is IPython, which features tab completion, object exploration and advanced history "
             "management.", 14, distractors=("bpython",)),
    Question("On most machines, how many bits does the numerator of a float's binary fraction use?", "53",
             "On most machines today, floats are approximated using a binary fraction with the numerator using "
             "the first 53 bits starting with the most significant bit and with the denominator as a power of "
             "two.", 15),
    Question("What should I call to total a list of floats accurately, without rounding errors piling up?",
             "fsum", "Another helpful tool is the math.fsum() function which helps mitigate loss-of-precision "
             "during summation.", 15, paraphrased=True),
    Question("Which command gives a script an executable mode?", "chmod",
             "The script can be given an executable mode, or permission, using the chmod command.", 16),
    Question("What must I define so that my own code runs by itself every time the interactive prompt opens?",
             "PYTHONSTARTUP", "You can do this by setting an environment variable named PYTHONSTARTUP to the "
             "name of a file containing your start-up commands.", 16,
             distractors=("usercustomize", "sitecustomize"), paraphrased=True),
)  # fmt: skip


def chapter_text(html: str) -> str:
    """The readable text of one tutorial page: its main body only (no navigation, sidebar or
    scripts), a blank line between paragraphs, code examples kept line by line."""
    soup = BeautifulSoup(html, "html.parser")
    body = soup.select_one('div[role="main"]') or soup.select_one("div.body")
    if body is None:
        raise ValueError("not a tutorial page: it has no main body (div.body)")
    for tag in body.select("script, style, a.headerlink"):  # headerlink: the "¶" after each heading
        tag.decompose()
    for tag in body.find_all(_BLOCKS):
        tag.insert_before("\n\n")
        tag.insert_after("\n\n")
    lines = (line.rstrip() for line in body.get_text().splitlines())
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n\n"


def _tutorial_dir(pattern: str) -> Path | None:
    found = [Path(d) for d in sorted(glob.glob(pattern)) if (Path(d) / CHAPTERS[0]).is_file()]
    return found[-1] if found else None


def _read_chapters(tutorial: Path) -> list[str]:
    missing = [name for name in CHAPTERS if not (tutorial / name).is_file()]
    if missing:
        raise ValueError(f"{tutorial} lacks {', '.join(missing)}")
    return [chapter_text((tutorial / name).read_text(encoding="utf-8", errors="replace")) for name in CHAPTERS]


def python_tutorial() -> RealDocument:
    """The whole Python tutorial as text, from the installed python3.11-doc, else from the
    package downloaded (not installed) into a temporary folder, as `vim_manual` does."""
    texts, version, where = package_files(PACKAGE, TUTORIAL_DIRS, _tutorial_dir, _read_chapters, "the Python tutorial")
    text, spans = "", {}
    for number, chapter in enumerate(texts, start=1):
        spans[number] = (len(text), len(text) + len(chapter))
        text += chapter
    return RealDocument(text, f"Python tutorial, chapters 1-{len(texts)} ({where})", PACKAGE, version, spans)
