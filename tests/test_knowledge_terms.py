"""The lexical leg's terms (knowledge.terms) and the fusion of the two legs (knowledge.fusion)."""

from concurrent.futures import ThreadPoolExecutor

from knowledge.fusion import VECTOR_WEIGHT, fuse
from knowledge.terms import TITLE_WEIGHT, chunk_terms, tokenize


def test_a_japanese_sentence_is_cut_into_words_not_kept_as_one_token():
    terms = tokenize("霧ヶ崎灯台の霧笛は今も聞くことができますか。")
    assert len(terms) >= 4 and "霧笛" in terms and "灯台" in terms
    assert "の" not in terms and "は" not in terms  # particles carry no content


def test_japanese_words_match_in_their_dictionary_form():
    # A conjugated verb in the passage and its plain form in the question are one term.
    assert set(tokenize("火が燃え広がり")) & set(tokenize("燃え広がる"))
    assert "燃え広がる" in tokenize("火が燃え広がった")


def test_width_and_kana_forms_fold_to_the_same_terms():
    assert tokenize("ＺＸ－４４７１－Ｂ") == tokenize("zx-4471-b")
    assert tokenize("ｶﾀｶﾅ") == tokenize("カタカナ")


def test_english_words_are_stemmed_and_codes_kept_whole_and_in_parts():
    assert tokenize("spring kits") == tokenize("spring kit")
    assert tokenize("ZX-4471-B") == ["zx-4471-b", "zx", "4471", "b"]
    assert tokenize("café") == ["café"]


def test_a_long_japanese_run_is_analysed_in_pieces():
    run = "霧笛は今も聞くことができる" * 5000  # 65,000 characters, no break: over Sudachi's input limit
    assert tokenize(run).count("霧笛") >= 4990  # a word cut at a piece's edge may be lost, not the run


def test_threads_tokenize_at_the_same_time():
    texts = ["霧ヶ崎灯台の霧笛は今も聞くことができますか。" * 50] * 16
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(tokenize, texts))
    assert all(r == results[0] for r in results)


def test_title_terms_count_as_a_weighted_field():
    terms = chunk_terms("Trellball rules", "The game of trellball.")
    assert terms[tokenize("trellball")[0]] == 1 + TITLE_WEIGHT
    assert terms[tokenize("game")[0]] == 1


def test_fusion_keeps_a_flat_leg_flat_and_breaks_ties_by_chunk_id():
    # The vector leg cannot tell b from c; the lexical leg can. Min-max scaling would turn the vector leg's
    # 0.001 difference into a full VECTOR_WEIGHT and put c first.
    ranked = fuse({"b": 0.300, "c": 0.301}, {"b": 10.0, "c": 8.0})
    assert [cid for cid, _ in ranked] == ["b", "c"]
    # Equal scores: ordered by id, whatever order the legs gave them in.
    assert [cid for cid, _ in fuse({"z": 1.0, "a": 1.0}, {})] == ["a", "z"]
    assert abs(fuse({"x": 0.5}, {"x": 3.0})[0][1] - 1.0) < 1e-9 and 0 < VECTOR_WEIGHT < 1
