//! Post-copy, the source side: after `precopy_rounds` pre-copy rounds (none: right away) the
//! guest pauses here, the destination learns which pages it still has to fetch and gets the
//! state, and once it is ready the guest runs there. From then on this side answers the
//! destination's page requests first and pushes the other pages in the background, until
//! every page is across.

use std::io::Write;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use migration::wire::{self, Frame, Reply, PAGE_SIZE};
use migration::Stream;

use super::{bit, Failure, Migration, Out, RegionView, READY_TIMEOUT};
use crate::migrate::Phase;

/// Pages in one background push run: small, so a request waits behind little.
const PUSH_RUN_PAGES: usize = 64;
/// How long the destination may stay silent once every page was pushed.
const DONE_TIMEOUT: Duration = Duration::from_secs(30);

/// Which pages still have to cross, and which did.
struct PushState {
    fetch: Vec<Vec<u64>>,
    sent: Vec<Vec<u64>>,
    /// The next page the background push looks at: (region, page).
    cursor: (usize, usize),
    requests: u64,
    /// Every region's size, to bounds-check requests (built once, not per request).
    bounds: Vec<wire::RegionInfo>,
}

impl PushState {
    fn new(fetch: Vec<Vec<u64>>, regions: &[RegionView]) -> Self {
        let sent = fetch.iter().map(|m| vec![0; m.len()]).collect();
        let bounds = regions
            .iter()
            .map(|r| wire::RegionInfo {
                guest_addr: 0,
                size: r.len as u64,
            })
            .collect();
        Self {
            fetch,
            sent,
            cursor: (0, 0),
            requests: 0,
            bounds,
        }
    }

    fn pending(&self, r: usize, p: usize) -> bool {
        bit(&self.fetch[r], p) && !bit(&self.sent[r], p)
    }

    fn mark_sent(&mut self, r: usize, first: usize, count: usize) {
        for p in first..first + count {
            self.sent[r][p / 64] |= 1 << (p % 64);
        }
    }

    /// The next run of pending pages from the cursor on (at most [`PUSH_RUN_PAGES`]).
    fn next_run(&mut self, regions: &[RegionView]) -> Option<(usize, usize, usize)> {
        while self.cursor.0 < regions.len() {
            let (r, pages) = (self.cursor.0, regions[self.cursor.0].pages());
            let mut p = self.cursor.1;
            while p < pages && !self.pending(r, p) {
                let word = self.fetch[r][p / 64] & !self.sent[r][p / 64];
                // Skip a word with nothing pending at once.
                if p.is_multiple_of(64) && word == 0 {
                    p += 64;
                } else {
                    p += 1;
                }
            }
            if p >= pages {
                self.cursor = (r + 1, 0);
                continue;
            }
            let first = p;
            while p < pages && p - first < PUSH_RUN_PAGES && self.pending(r, p) {
                p += 1;
            }
            self.cursor = (r, p);
            return Some((r, first, p - first));
        }
        None
    }

    fn remaining_pages(&self) -> u64 {
        self.fetch
            .iter()
            .zip(&self.sent)
            .flat_map(|(f, s)| f.iter().zip(s))
            .map(|(f, s)| u64::from((f & !s).count_ones()))
            .sum()
    }
}

impl Migration<'_> {
    /// Post-copy: pre-copy rounds if asked, the switch, then serve and push until every page
    /// is across.
    pub(super) fn postcopy(
        &mut self,
        out: &mut Out,
        reader: &mut Stream,
        regions: &[RegionView],
    ) -> Result<(), Failure> {
        let rounds = self.opts.precopy_rounds;
        let fetch = if rounds == 0 {
            self.pause_for_handover(0)?;
            // Nothing was sent: the destination fetches every page the guest touched.
            self.touched_pages(regions)?
                .iter()
                .map(|touched| to_bitmap(touched))
                .collect()
        } else {
            self.first_pass(out, regions)?;
            for round in 1..rounds {
                self.check_cancel()?;
                let dirty = self.harvest()?;
                self.update(|s| {
                    s.round = round;
                    s.remaining_bytes = count_bits(&dirty) * PAGE_SIZE;
                });
                out.frame(&Frame::Round(round))?;
                self.send_pages(out, regions, &|r, p| bit(&dirty[r], p), false)?;
                out.w.flush()?;
                self.report(out, round);
            }
            self.pause_for_handover(rounds)?;
            // What was written since it was sent must be fetched again.
            self.harvest()?
        };
        let mut push = PushState::new(fetch, regions);
        tracing::debug!(
            pages = push.remaining_pages(),
            "post-copy: switching to the destination"
        );
        for (region, bitmap) in push.fetch.iter().enumerate() {
            out.frame(&Frame::Fetch {
                region: region as u32,
                bitmap: bitmap.clone(),
            })?;
        }
        self.send_state(out)?;
        out.w.flush()?;
        let replies = spawn_reply_reader(reader)?;

        // The destination builds the VM; it may already fault on pages while it does.
        let ready_by = Instant::now() + READY_TIMEOUT;
        loop {
            match next_reply(&replies, ready_by)? {
                Reply::Ready => break,
                Reply::Request {
                    region,
                    first_page,
                    count,
                } => {
                    if self.serve(out, regions, &mut push, region, first_page, count)? {
                        out.w.flush()?;
                    }
                }
                Reply::Failed(reason) => {
                    return Err(Failure::Failed(format!(
                        "The destination could not start the VM: {reason}"
                    )))
                }
                other => return Err(Failure::Failed(format!("Unexpected reply {other:?}"))),
            }
        }
        self.check_cancel()?;
        // From here on the guest never runs here again.
        self.committed = true;
        self.postcopy_started = true;
        out.frame(&Frame::Commit)?;
        out.w.flush()?;
        self.update(|s| {
            s.phase = Phase::Postcopy;
            s.remaining_bytes = push.remaining_pages() * PAGE_SIZE;
        });

        let mut runs = 0u64;
        loop {
            // Requests jump the queue.
            let mut served = false;
            loop {
                match replies.try_recv() {
                    Ok(reply) => {
                        served |= self.on_reply(out, regions, &mut push, reply?)?;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                    Err(mpsc::TryRecvError::Disconnected) => {
                        return Err(Failure::Failed("The reply reader stopped".into()))
                    }
                }
            }
            if served {
                out.w.flush()?;
            }
            let Some((r, first, count)) = push.next_run(regions) else {
                break;
            };
            self.send_span(out, r, &regions[r], first..first + count, false)?;
            push.mark_sent(r, first, count);
            runs += 1;
            if runs.is_multiple_of(256) {
                self.report(out, rounds);
                let (left, requests) = (push.remaining_pages(), push.requests);
                self.update(|s| {
                    s.remaining_bytes = left * PAGE_SIZE;
                    s.postcopy_requests = requests;
                });
            }
        }
        out.frame(&Frame::PostcopyEnd)?;
        out.w.flush()?;
        self.update(|s| s.remaining_bytes = 0);
        self.report(out, rounds);
        let done_by = Instant::now() + DONE_TIMEOUT;
        loop {
            match next_reply(&replies, done_by)? {
                Reply::PostcopyDone => break,
                other => {
                    self.on_reply(out, regions, &mut push, other)?;
                }
            }
        }
        let requests = push.requests;
        self.update(|s| s.postcopy_requests = requests);
        Ok(())
    }

    /// Handle a reply after the commit; true if pages were sent.
    fn on_reply(
        &mut self,
        out: &mut Out,
        regions: &[RegionView],
        push: &mut PushState,
        reply: Reply,
    ) -> Result<bool, Failure> {
        match reply {
            Reply::Running => {
                self.resumed_at = Some(Instant::now());
                tracing::debug!("post-copy: the guest runs on the destination");
                Ok(false)
            }
            Reply::Request {
                region,
                first_page,
                count,
            } => self.serve(out, regions, push, region, first_page, count),
            Reply::Failed(reason) => Err(Failure::Failed(format!(
                "The destination failed during post-copy: {reason}"
            ))),
            other => Err(Failure::Failed(format!(
                "Unexpected reply {other:?} during post-copy"
            ))),
        }
    }

    /// Send the pages the destination asked for that are still pending (the others are on
    /// their way already); true if any was sent.
    fn serve(
        &self,
        out: &mut Out,
        regions: &[RegionView],
        push: &mut PushState,
        region: u32,
        first_page: u64,
        count: u32,
    ) -> Result<bool, Failure> {
        wire::run_bounds(&push.bounds, region, first_page, u64::from(count))?;
        push.requests += 1;
        let r = region as usize;
        let first = first_page as usize;
        let wanted: Vec<usize> = (first..first + count as usize)
            .filter(|&p| push.pending(r, p))
            .collect();
        if wanted.is_empty() {
            return Ok(false);
        }
        self.send_span(out, r, &regions[r], wanted.iter().copied(), false)?;
        for p in wanted {
            push.mark_sent(r, p, 1);
        }
        Ok(true)
    }
}

/// Read the destination's replies on a thread of their own (requests arrive while pages are
/// written), until the connection ends.
fn spawn_reply_reader(reader: &Stream) -> Result<mpsc::Receiver<Result<Reply, Failure>>, Failure> {
    let mut r = reader.try_clone()?;
    // The destination may be silent for long while pages are pushed; the loops above keep
    // their own deadlines, and a cancel cuts the connection.
    r.set_read_timeout(None)?;
    let (tx, rx) = mpsc::channel();
    std::thread::Builder::new()
        .name("migrate-replies".into())
        .spawn(move || loop {
            match wire::read_reply(&mut r) {
                Ok(reply) => {
                    if tx.send(Ok(reply)).is_err() {
                        return;
                    }
                }
                Err(e) => {
                    let _ = tx.send(Err(Failure::from(e)));
                    return;
                }
            }
        })?;
    Ok(rx)
}

fn next_reply(
    replies: &mpsc::Receiver<Result<Reply, Failure>>,
    by: Instant,
) -> Result<Reply, Failure> {
    match replies.recv_timeout(by.saturating_duration_since(Instant::now())) {
        Ok(reply) => reply,
        Err(mpsc::RecvTimeoutError::Timeout) => Err(Failure::Failed(
            "The destination did not answer in time".into(),
        )),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            Err(Failure::Failed("The reply reader stopped".into()))
        }
    }
}

fn to_bitmap(pages: &[bool]) -> Vec<u64> {
    let mut map = vec![0u64; pages.len().div_ceil(64)];
    for (p, _) in pages.iter().enumerate().filter(|(_, &t)| t) {
        map[p / 64] |= 1 << (p % 64);
    }
    map
}

fn count_bits(maps: &[Vec<u64>]) -> u64 {
    maps.iter()
        .flatten()
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(pages: usize) -> RegionView {
        RegionView {
            ptr: std::ptr::null(),
            len: pages * PAGE_SIZE as usize,
            file_backed: false,
        }
    }

    #[test]
    fn test_background_push_visits_each_pending_page_once_in_bounded_runs() {
        let regions = [view(200), view(64)];
        let mut fetch0 = to_bitmap(&[true; 200]);
        fetch0[1] = 0; // pages 64..128 never touched
        let mut push = PushState::new(vec![fetch0, to_bitmap(&[true; 64])], &regions);
        push.mark_sent(0, 10, 2); // a request served earlier

        let mut runs = Vec::new();
        while let Some(run) = push.next_run(&regions) {
            push.mark_sent(run.0, run.1, run.2);
            runs.push(run);
        }

        assert_eq!(
            runs,
            vec![
                (0, 0, 10),
                (0, 12, 52),
                (0, 128, 64),
                (0, 192, 8),
                (1, 0, 64)
            ]
        );
        assert_eq!(push.remaining_pages(), 0);
    }
}
