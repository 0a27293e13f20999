"""The dashboard: API-key sign-in to a signed cookie, CSRF-checked forms, the pages' content, team isolation; and
the same in a real headless Chromium with the network off (screenshots under $LANGADAPT_TEST_ARTIFACTS)."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from langadapt.jobs import execution
from langadapt.jobs.db import make_engine, make_sessionmaker, session_scope
from langadapt.jobs.models import Job, JobStatus
from tests.jobs.conftest import LiveServer, job_body, new_team_key

LOSSES = [4.0 - 0.25 * step for step in range(1, 11)]


def record_finished_job(settings, job_id: str) -> None:
    """What a worker records for a job that ran: stage events, CPT metrics, scores, success."""
    engine = make_engine(settings.database)
    with session_scope(make_sessionmaker(engine)) as session:
        execution.claim_job(session, job_id, "test-worker", settings)
        for stage, seconds in (("tokenizer", 1.5), ("init", 0.5), ("cpt", 12.0), ("evaluate", 3.0)):
            execution.set_stage(session, job_id, stage)
            execution.append_event(session, job_id, type="stage", stage=stage, message="started")
            if stage == "cpt":
                for step, loss in enumerate(LOSSES, 1):
                    data = {"step": step, "total": 10, "unit": "steps", "loss": loss, "tokens_per_s": 1000.0 + step}
                    execution.append_event(session, job_id, type="metrics", stage="cpt", data=data)
            execution.append_event(session, job_id, type="stage", stage=stage, message=f"done in {seconds} s")
        rows = [
            {"model": "original", "task": "symbols_per_token", "metric": "target", "value": 2.1, "n": 10},
            {"model": "adapted", "task": "symbols_per_token", "metric": "target", "value": 3.4, "n": 10},
            {"model": "original", "task": "bits_per_char", "metric": "target", "value": 1.9, "n": 10},
            {"model": "adapted", "task": "bits_per_char", "metric": "target", "value": 1.7, "n": 10},
        ]
        execution.record_scores(session, session.get(Job, job_id), rows)
        execution.finish_job(session, job_id, "test-worker", JobStatus.succeeded)
    engine.dispose()


def start_running_job(settings, job_id: str) -> None:
    engine = make_engine(settings.database)
    with session_scope(make_sessionmaker(engine)) as session:
        execution.claim_job(session, job_id, "test-worker", settings)
        execution.set_stage(session, job_id, "cpt")
        execution.set_progress(session, job_id, step=3, total=10, eta_s=20.0)
    engine.dispose()


@pytest.fixture
def two_jobs(client, auth, files, model_root, settings) -> dict[str, str]:
    body = job_body(model_root, files, instruct_model=None)
    finished = client.post("/v1/jobs", headers=auth, json=body).json()["id"]
    running = client.post("/v1/jobs", headers=auth, json={**body, "labels": {"suite": "live"}}).json()["id"]
    record_finished_job(settings, finished)
    start_running_job(settings, running)
    return {"finished": finished, "running": running}


def sign_in(client, key: str):
    form = client.get("/dashboard/login")
    csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    return client.post("/dashboard/login", data={"api_key": key, "csrf": csrf}, follow_redirects=False)


def csrf_of(page: str) -> str:
    return re.search(r'name="csrf" value="([^"]+)"', page).group(1)


def test_sign_in_sets_a_signed_strict_cookie_without_the_key(client, auth) -> None:
    assert client.get("/dashboard", follow_redirects=False).headers["location"] == "/dashboard/login"
    key = auth["Authorization"].removeprefix("Bearer ")
    wrong = sign_in(client, "la_wrong")
    assert wrong.status_code == 401 and "invalid or revoked API key" in wrong.text
    client.cookies.clear()
    no_form_cookie = client.post("/dashboard/login", data={"api_key": key, "csrf": "forged"})
    assert no_form_cookie.status_code == 403 and no_form_cookie.json()["error"]["code"] == "csrf_token_invalid"
    signed = sign_in(client, key)
    assert signed.status_code == 303 and signed.headers["location"] == "/dashboard"
    cookie = next(c for c in signed.headers.get_list("set-cookie") if c.startswith("langadapt_session="))
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/dashboard" in cookie
    assert key not in cookie and key[-12:] not in cookie
    assert client.get("/dashboard").status_code == 200


def test_pages_show_the_teams_jobs_and_forms_need_the_csrf_token(client, auth, settings, two_jobs) -> None:
    sign_in(client, auth["Authorization"].removeprefix("Bearer "))
    jobs = client.get("/dashboard").text
    assert two_jobs["finished"] in jobs and two_jobs["running"] in jobs
    assert '<meta http-equiv="refresh"' in jobs  # a running job: the table refreshes itself
    assert two_jobs["running"] in client.get("/dashboard?label=suite:live").text
    assert two_jobs["finished"] not in client.get("/dashboard?label=suite:live").text

    page = client.get(f"/dashboard/jobs/{two_jobs['finished']}").text
    points = re.search(r'id="loss-curve".*?points="([^"]+)"', page, re.S).group(1).split()
    assert len(points) == len(LOSSES)
    ys = [float(point.split(",")[1]) for point in points]
    assert ys == sorted(ys, reverse=False)  # falling loss: rising y in SVG pixels... from the top
    assert "<td>bits_per_char</td><td>target</td>" in page and "1.7000" in page and "1.9000" in page
    assert "12.0 s" in page and 'id="cancel"' not in page and 'id="retry"' not in page

    running = client.get(f"/dashboard/jobs/{two_jobs['running']}").text
    action = f"/dashboard/jobs/{two_jobs['running']}/cancel"
    assert client.post(action, data={"csrf": "forged"}).status_code == 403
    assert client.get(f"/v1/jobs/{two_jobs['running']}", headers=auth).json()["status"] == "running"
    done = client.post(action, data={"csrf": csrf_of(running)}, follow_redirects=False)
    assert done.status_code == 303
    assert client.get(f"/v1/jobs/{two_jobs['running']}", headers=auth).json()["status"] == "cancelling"

    results = client.get("/dashboard/results?group=vocab_method").text
    assert results.count('<circle class="dot"') == 2  # original and adapted of the finished job
    assert "<h3>bits_per_char · target</h3>" in results


def test_retry_from_the_job_page_queues_the_job_again(client, auth, files, model_root) -> None:
    job = client.post("/v1/jobs", headers=auth, json=job_body(model_root, files, instruct_model=None)).json()["id"]
    assert client.post(f"/v1/jobs/{job}/cancel", headers=auth).json()["status"] == "cancelled"  # queued: at once
    sign_in(client, auth["Authorization"].removeprefix("Bearer "))
    page = client.get(f"/dashboard/jobs/{job}").text
    assert 'id="retry"' in page
    done = client.post(f"/dashboard/jobs/{job}/retry", data={"csrf": csrf_of(page)}, follow_redirects=False)
    assert done.status_code == 303
    again = client.get(f"/v1/jobs/{job}", headers=auth).json()
    assert (again["status"], again["attempt"]) == ("queued", 2)


def test_another_teams_session_sees_none_of_its_jobs(client, auth, settings, two_jobs) -> None:
    sign_in(client, new_team_key(settings))
    page = client.get("/dashboard").text
    assert "No jobs." in page and two_jobs["finished"] not in page
    assert client.get(f"/dashboard/jobs/{two_jobs['finished']}").status_code == 404
    assert client.get("/dashboard/results").text.count('<circle class="dot"') == 0
    other = client.get(f"/dashboard/jobs/{two_jobs['running']}").status_code
    assert other == 404


def _chromium() -> tuple[str, str] | None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.mark.skipif(_chromium() is None, reason="needs Debian's chromium and chromium-driver (apt-get install)")
def test_in_a_headless_browser_with_the_network_off(settings, auth, two_jobs, tmp_path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.wait import WebDriverWait

    def shown(driver, css: str):
        return WebDriverWait(driver, 20).until(expected_conditions.presence_of_element_located((By.CSS_SELECTOR, css)))

    browser, driver_path = _chromium()
    shots = Path(os.environ.get("LANGADAPT_TEST_ARTIFACTS", tmp_path)) / "dashboard"
    shots.mkdir(parents=True, exist_ok=True)
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,1000"):
        options.add_argument(flag)
    # The network is off: every request that is not for the service goes to a closed port and fails.
    options.add_argument("--proxy-server=http://127.0.0.1:9")
    options.add_argument("--proxy-bypass-list=127.0.0.1")
    with LiveServer(settings) as server:
        driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))
        try:
            driver.get(f"{server.url}/dashboard")
            assert driver.current_url.endswith("/dashboard/login")
            driver.save_screenshot(str(shots / "login.png"))
            driver.find_element(By.ID, "api_key").send_keys(auth["Authorization"].removeprefix("Bearer "))
            driver.find_element(By.ID, "sign-in").click()
            shown(driver, "#jobs")
            rows = driver.find_elements(By.CSS_SELECTOR, "#jobs tbody tr")
            assert len(rows) == 2
            driver.save_screenshot(str(shots / "jobs.png"))

            driver.get(f"{server.url}/dashboard/jobs/{two_jobs['finished']}")
            loss = driver.find_element(By.CSS_SELECTOR, "#loss-curve polyline").get_attribute("points").split()
            assert len(loss) == len(LOSSES)
            assert driver.find_element(By.CSS_SELECTOR, "#loss-curve").size["width"] > 300  # laid out, styled
            assert len(driver.find_elements(By.CSS_SELECTOR, "#scores tbody tr")) == 2
            driver.save_screenshot(str(shots / "job.png"))

            driver.get(f"{server.url}/dashboard/jobs/{two_jobs['running']}")
            driver.find_element(By.ID, "cancel").click()
            cancelling = expected_conditions.text_to_be_present_in_element((By.ID, "status"), "cancelling")
            WebDriverWait(driver, 20).until(cancelling)
            driver.save_screenshot(str(shots / "job-cancelling.png"))

            driver.get(f"{server.url}/dashboard/results")
            assert len(driver.find_elements(By.CSS_SELECTOR, "#scatter circle")) == 2
            driver.save_screenshot(str(shots / "results.png"))
            resources = driver.execute_script(
                "return performance.getEntriesByType('resource').map(e => e.name).concat([document.styleSheets.length])"
            )
            assert resources[-1] == 1 and all(str(r).startswith(server.url) for r in resources[:-1])

            driver.delete_all_cookies()  # another team signs in on the same browser
            driver.get(f"{server.url}/dashboard/login")
            driver.find_element(By.ID, "api_key").send_keys(new_team_key(settings))
            driver.find_element(By.ID, "sign-in").click()
            assert shown(driver, "#jobs tbody").text == "No jobs."
            driver.save_screenshot(str(shots / "jobs-other-team.png"))
        finally:
            driver.quit()
    assert {p.name for p in shots.iterdir()} >= {"login.png", "jobs.png", "job.png", "results.png"}
