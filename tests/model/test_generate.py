

def test_progress_bar_writes_plain_lines_when_stderr_is_not_a_terminal(capsys):
    from personascope.model.generate import progress_bar

    with progress_bar() as bar:
        bar.every = 0.0
        task = bar.add_task("judge", total=3, rate="")
        for i in range(3):
            bar.update(task, advance=1, rate=f"{i + 1} scores/s")
    err = capsys.readouterr().err
    assert "judge: 2/3 2 scores/s" in err and "judge: 3/3 3 scores/s" in err
