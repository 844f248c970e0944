import torch

from finetune.orpo_loss import (
    chunked_label_logprobs,
    full_label_logprobs,
    odds_ratio_terms,
    sequence_logprobs,
)


def _inputs(seed=0, n=37, hidden=16, vocab=101):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, vocab, (n,), generator=g)
    return h, w, labels


def test_chunked_logprobs_equal_full_logits_logprobs():
    h, w, labels = _inputs()
    torch.testing.assert_close(chunked_label_logprobs(h, w, labels, chunk_size=8), full_label_logprobs(h, w, labels))


def test_chunked_logprobs_gradients_equal_full_logits_gradients():
    h, w, labels = _inputs()
    weights = torch.randn(h.shape[0], dtype=torch.float64)
    (chunked_label_logprobs(h, w, labels, chunk_size=8).double() * weights).sum().backward()
    grads = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (full_label_logprobs(h, w, labels) * weights).sum().backward()
    torch.testing.assert_close(grads[0], h.grad)
    torch.testing.assert_close(grads[1], w.grad)


def test_chunked_logprobs_pass_gradcheck():
    h, w, labels = _inputs(n=6, hidden=4, vocab=7)
    assert torch.autograd.gradcheck(lambda a, b: chunked_label_logprobs(a, b, labels, 4).double(), (h, w))


def test_sequence_logprobs_match_trl_full_logits_computation():
    from trl.experimental.orpo import ORPOTrainer

    torch.manual_seed(0)
    batch, length, hidden, vocab = 4, 12, 8, 50
    h = torch.randn(batch, length, hidden, dtype=torch.float64)
    w = torch.randn(vocab, hidden, dtype=torch.float64)
    ids = torch.randint(0, vocab, (batch, length))
    attention = torch.ones(batch, length, dtype=torch.long)
    attention[1, 9:] = 0  # padding
    labels = torch.where(attention == 1, ids, -100)
    labels[:, :5] = -100  # prompt
    mean_logps, chosen_nll = sequence_logprobs(h, w, ids, attention, labels != -100, n_chosen=2, chunk_size=5)

    logits = h @ w.T
    expected = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=True)
    torch.testing.assert_close(mean_logps, expected)
    nll_labels = torch.where(attention == 1, ids, -100)[:2, 1:]
    expected_nll = torch.nn.functional.cross_entropy(logits[:2, :-1].reshape(-1, vocab), nll_labels.reshape(-1))
    torch.testing.assert_close(chosen_nll, expected_nll)


def test_odds_ratio_loss_is_log2_when_chosen_and_rejected_are_equally_likely():
    log_odds, loss = odds_ratio_terms(torch.tensor([-2.0]), torch.tensor([-2.0]))
    assert log_odds.item() == 0.0
    torch.testing.assert_close(loss, torch.log(torch.tensor([2.0])))


def test_odds_ratio_loss_falls_as_chosen_becomes_more_likely():
    _, worse = odds_ratio_terms(torch.tensor([-3.0]), torch.tensor([-1.0]))
    _, better = odds_ratio_terms(torch.tensor([-1.0]), torch.tensor([-3.0]))
    assert better.item() < worse.item()
