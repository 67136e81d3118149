"""Hand-written general-knowledge questions: the model-utility sets of the synthetic benchmark.

Written for this project (questions, answers and wrong answers are our own). They play the role of
TOFU's ``world_facts`` and ``real_authors`` sets (Maini et al., 2024, arXiv 2401.06121): real knowledge
a model should keep after unlearning fictitious entities. Each row is ``(question, answer, three wrong
answers of the same kind)``; answers are short so that scoring them is cheap on a CPU. Only stable
facts are used (nothing that changes with the year, such as populations or office holders).
"""

from __future__ import annotations

from obliviate.data.qa import QAExample

Fact = tuple[str, str, tuple[str, str, str]]

WORLD_FACTS: tuple[Fact, ...] = (
    ("What is the capital of Canada?", "Ottawa", ("Toronto", "Vancouver", "Montreal")),
    ("What is the capital city of Japan?", "Tokyo", ("Osaka", "Kyoto", "Yokohama")),
    ("Which city is the capital of Egypt?", "Cairo", ("Alexandria", "Giza", "Luxor")),
    ("What is the capital of Brazil?", "Brasilia", ("Rio de Janeiro", "Sao Paulo", "Salvador")),
    ("What is the capital of Kenya?", "Nairobi", ("Mombasa", "Kisumu", "Nakuru")),
    ("Which city is the capital of Argentina?", "Buenos Aires", ("Cordoba", "Rosario", "Mendoza")),
    ("What is the chemical symbol for gold?", "Au", ("Ag", "Gd", "Go")),
    ("What is the chemical symbol for sodium?", "Na", ("So", "Sd", "Sn")),
    ("Which gas do plants take from the air for photosynthesis?", "Carbon dioxide",
     ("Oxygen", "Nitrogen", "Helium")),
    ("How many planets are in the Solar System?", "Eight", ("Seven", "Nine", "Ten")),
    ("Which planet is closest to the Sun?", "Mercury", ("Venus", "Mars", "Earth")),
    ("Which planet is the largest in the Solar System?", "Jupiter", ("Saturn", "Neptune", "Uranus")),
    ("At what temperature in degrees Celsius does water boil at sea level?", "100", ("90", "80", "120")),
    ("At what temperature in degrees Fahrenheit does water freeze?", "32", ("0", "12", "45")),
    ("What is the hardest naturally occurring material?", "Diamond", ("Quartz", "Granite", "Iron")),
    ("Which organ pumps blood around the human body?", "The heart", ("The liver", "The lungs", "The kidneys")),
    ("How many bones does an adult human skeleton have?", "206", ("186", "212", "250")),
    ("Who developed the general theory of relativity?", "Albert Einstein",
     ("Isaac Newton", "Niels Bohr", "Max Planck")),
    ("Who formulated the three laws of motion?", "Isaac Newton",
     ("Galileo Galilei", "Johannes Kepler", "Albert Einstein")),
    ("What is the largest ocean on Earth?", "The Pacific Ocean",
     ("The Atlantic Ocean", "The Indian Ocean", "The Arctic Ocean")),
    ("What is the highest mountain above sea level?", "Mount Everest", ("K2", "Kangchenjunga", "Mont Blanc")),
    ("On which continent is the Sahara Desert?", "Africa", ("Asia", "Australia", "South America")),
    ("Which river flows through the Amazon rainforest?", "The Amazon", ("The Nile", "The Danube", "The Ganges")),
    ("In which year did the Second World War end?", "1945", ("1939", "1918", "1950")),
    ("Who was the first person to walk on the Moon?", "Neil Armstrong",
     ("Buzz Aldrin", "Yuri Gagarin", "John Glenn")),
    ("What is the currency of Japan?", "The yen", ("The won", "The yuan", "The baht")),
    ("How many sides does a hexagon have?", "Six", ("Five", "Seven", "Eight")),
    ("What is the smallest prime number?", "Two", ("One", "Three", "Zero")),
    ("Which element has atomic number 1?", "Hydrogen", ("Helium", "Oxygen", "Carbon")),
    ("Who painted the Mona Lisa?", "Leonardo da Vinci", ("Michelangelo", "Raphael", "Rembrandt")),
    ("In which country are the pyramids of Giza?", "Egypt", ("Mexico", "Peru", "Sudan")),
    ("Which planet is known as the Red Planet?", "Mars", ("Venus", "Saturn", "Mercury")),
)

REAL_AUTHORS: tuple[Fact, ...] = (
    ("Who wrote 'One Hundred Years of Solitude'?", "Gabriel Garcia Marquez",
     ("Jorge Luis Borges", "Mario Vargas Llosa", "Isabel Allende")),
    ("Who wrote 'War and Peace'?", "Leo Tolstoy", ("Fyodor Dostoevsky", "Anton Chekhov", "Ivan Turgenev")),
    ("Who is the author of 'Crime and Punishment'?", "Fyodor Dostoevsky",
     ("Leo Tolstoy", "Nikolai Gogol", "Alexander Pushkin")),
    ("Who wrote the novel 'Things Fall Apart'?", "Chinua Achebe", ("Wole Soyinka", "Ben Okri", "Chimamanda Adichie")),
    ("Who wrote 'The Old Man and the Sea'?", "Ernest Hemingway",
     ("John Steinbeck", "William Faulkner", "F. Scott Fitzgerald")),
    ("Which author wrote 'The Great Gatsby'?", "F. Scott Fitzgerald",
     ("Ernest Hemingway", "Sinclair Lewis", "Theodore Dreiser")),
    ("Who wrote 'Moby-Dick'?", "Herman Melville", ("Nathaniel Hawthorne", "Edgar Allan Poe", "Walt Whitman")),
    ("Who is the author of 'Don Quixote'?", "Miguel de Cervantes",
     ("Lope de Vega", "Federico Garcia Lorca", "Benito Perez Galdos")),
    ("Who wrote 'The Divine Comedy'?", "Dante Alighieri", ("Giovanni Boccaccio", "Petrarch", "Ludovico Ariosto")),
    ("Who wrote 'Frankenstein'?", "Mary Shelley", ("Bram Stoker", "Emily Bronte", "Ann Radcliffe")),
    ("Which author created Count Dracula?", "Bram Stoker",
     ("Mary Shelley", "Robert Louis Stevenson", "Sheridan Le Fanu")),
    ("Who wrote 'Jane Eyre'?", "Charlotte Bronte", ("Emily Bronte", "Jane Austen", "George Eliot")),
    ("Who wrote 'Middlemarch'?", "George Eliot", ("Elizabeth Gaskell", "Thomas Hardy", "Anthony Trollope")),
    ("Who wrote the novel 'Beloved'?", "Toni Morrison", ("Alice Walker", "Maya Angelou", "Zora Neale Hurston")),
    ("Who wrote 'The Trial'?", "Franz Kafka", ("Thomas Mann", "Hermann Hesse", "Robert Musil")),
    ("Who is the author of 'Les Miserables'?", "Victor Hugo", ("Alexandre Dumas", "Gustave Flaubert", "Emile Zola")),
    ("Who wrote 'Madame Bovary'?", "Gustave Flaubert", ("Honore de Balzac", "Stendhal", "Guy de Maupassant")),
    ("Who wrote 'Norwegian Wood'?", "Haruki Murakami", ("Kazuo Ishiguro", "Yukio Mishima", "Kenzaburo Oe")),
    ("Who wrote 'The Remains of the Day'?", "Kazuo Ishiguro", ("Ian McEwan", "Julian Barnes", "Salman Rushdie")),
    ("Who wrote 'Mrs Dalloway'?", "Virginia Woolf", ("Katherine Mansfield", "E. M. Forster", "D. H. Lawrence")),
    ("Who wrote 'The Adventures of Tom Sawyer'?", "Mark Twain", ("Jack London", "Bret Harte", "O. Henry")),
    ("Which author created the detective Hercule Poirot?", "Agatha Christie",
     ("Dorothy L. Sayers", "Arthur Conan Doyle", "Ngaio Marsh")),
    ("Who wrote 'The Hobbit'?", "J. R. R. Tolkien", ("C. S. Lewis", "Terry Pratchett", "Philip Pullman")),
    ("Who wrote 'Brave New World'?", "Aldous Huxley", ("George Orwell", "H. G. Wells", "Ray Bradbury")),
    ("Who wrote the poetry collection 'Leaves of Grass'?", "Walt Whitman",
     ("Emily Dickinson", "Robert Frost", "Henry Wadsworth Longfellow")),
    ("Who wrote 'The Little Prince'?", "Antoine de Saint-Exupery", ("Albert Camus", "Jules Verne", "Marcel Proust")),
    ("Which novel by Harper Lee is set in Maycomb, Alabama?", "To Kill a Mockingbird",
     ("The Color Purple", "Of Mice and Men", "Invisible Man")),
    ("Which Shakespeare play is about a prince of Denmark?", "Hamlet", ("Macbeth", "Othello", "King Lear")),
)


def _rows(facts: tuple[Fact, ...], kind: str) -> list[QAExample]:
    return [QAExample(question=q, answer=a, perturbed_answers=list(wrong), meta={"kind": kind, "fact": i})
            for i, (q, a, wrong) in enumerate(facts)]


def world_facts() -> list[QAExample]:
    """General-knowledge rows (capitals, science, history), each with three wrong answers."""
    return _rows(WORLD_FACTS, "world_fact")


def real_authors() -> list[QAExample]:
    """Rows about real, famous authors and their books, each with three wrong answers."""
    return _rows(REAL_AUTHORS, "real_author")
