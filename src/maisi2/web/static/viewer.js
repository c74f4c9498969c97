// Three-plane slice viewer on 2D canvases: axial, coronal, sagittal, a crosshair shared by the three,
// window presets, a label overlay, wheel scrolling, and clicks turned into voxel coordinates.
//
// Slices come from the server in array order; arrays are RAS (+x the patient's right, +y anterior,
// +z superior). Display is radiological, as in the preview PNG that `maisi2 generate` writes: the
// patient's right on the image's left, anterior and superior up. VIEWS holds that decision alone.

// view -> which array axis is fixed (the slice), which runs across the screen and which runs down.
// Screen columns and rows both run against their array axis (flipped), which gives the layout above.
export const VIEWS = {
  axial: { axis: 2, col: 0, row: 1 },
  coronal: { axis: 1, col: 0, row: 2 },
  sagittal: { axis: 0, col: 1, row: 2 },
};

export class Viewer {
  constructor(canvases, { fetchSlice, onCursor, onPick }) {
    this.canvases = canvases; // {axial: canvas, ...}
    this.fetchSlice = fetchSlice; // async (layer, axis, index) -> {data, shape}
    this.onCursor = onCursor; // (voxel, values) after the crosshair moves
    this.onPick = onPick; // (voxel) when a click should act (e.g. add a tumour); null: navigate
    this.window = { width: 400, level: 40 };
    this.overlay = 0.35;
    this.info = null;
    this.slices = {};
    this.transforms = {};
    for (const [name, canvas] of Object.entries(canvases)) {
      canvas.addEventListener("click", (e) => this.click(name, e));
      canvas.addEventListener("wheel", (e) => { e.preventDefault(); this.scroll(name, Math.sign(e.deltaY)); }, { passive: false });
    }
  }

  // Show a volume: info = {shape, spacing, has_ct, legend}; keeps the crosshair when the grid is the same.
  async open(info) {
    const same = this.info && this.info.shape.join() === info.shape.join();
    this.info = info;
    this.cursor = same ? this.cursor : info.shape.map((n) => Math.floor(n / 2));
    this.colours = new Map(info.legend.map((l) => [l.id, l.colour]));
    this.names = new Map(info.legend.map((l) => [l.id, l.name]));
    this.slices = {};
    await Promise.all(Object.keys(VIEWS).map((name) => this.load(name)));
    this.drawAll();
    this.report();
  }

  async load(name) {
    const axis = VIEWS[name].axis;
    const index = this.cursor[axis];
    const labels = await this.fetchSlice("labels", axis, index);
    const ct = this.info.has_ct ? await this.fetchSlice("ct", axis, index) : null;
    this.slices[name] = { index, labels, ct };
  }

  setWindow(width, level) { this.window = { width, level }; this.drawAll(); }
  setOverlay(alpha) { this.overlay = alpha; this.drawAll(); }

  async scroll(name, delta) {
    if (!this.info) return;
    const axis = VIEWS[name].axis;
    const next = Math.min(this.info.shape[axis] - 1, Math.max(0, this.cursor[axis] + delta));
    if (next === this.cursor[axis]) return;
    this.cursor[axis] = next;
    await this.load(name);
    this.drawAll();
    this.report();
  }

  async click(name, event) {
    if (!this.info) return;
    const voxel = this.voxelAt(name, event.offsetX, event.offsetY);
    if (!voxel) return;
    await this.moveTo(voxel);
    if (this.onPick) this.onPick(voxel);
  }

  async moveTo(voxel) {
    const moved = Object.keys(VIEWS).filter((n) => this.cursor[VIEWS[n].axis] !== voxel[VIEWS[n].axis]);
    this.cursor = voxel.slice();
    await Promise.all(moved.map((n) => this.load(n)));
    this.drawAll();
    this.report();
  }

  // Canvas pixel (CSS px) -> voxel [x, y, z], or null outside the image.
  voxelAt(name, px, py) {
    const t = this.transforms[name];
    if (!t) return null;
    const c = Math.floor((px - t.left) / t.colPx), r = Math.floor((py - t.top) / t.rowPx);
    if (c < 0 || r < 0 || c >= t.cols || r >= t.rows) return null;
    const v = VIEWS[name], voxel = this.cursor.slice();
    voxel[v.col] = t.cols - 1 - c;
    voxel[v.row] = t.rows - 1 - r;
    return voxel;
  }

  // Voxel -> canvas pixel (CSS px) at the voxel's centre in a view (what a user clicks on).
  canvasPoint(name, voxel) {
    const t = this.transforms[name], v = VIEWS[name];
    return { x: t.left + (t.cols - 1 - voxel[v.col] + 0.5) * t.colPx, y: t.top + (t.rows - 1 - voxel[v.row] + 0.5) * t.rowPx };
  }

  valueAt(voxel) {
    // The axial slice at the cursor holds (x, y); its array is shape (nx, ny).
    const s = this.slices.axial;
    if (!s || s.index !== voxel[2]) return {};
    const i = voxel[0] * s.labels.shape[1] + voxel[1];
    return { label: s.labels.data[i], hu: s.ct ? s.ct.data[i] : null };
  }

  report() {
    const values = this.valueAt(this.cursor);
    if (this.onCursor) this.onCursor(this.cursor.slice(), { ...values, name: this.names.get(values.label) || "background" });
  }

  drawAll() { for (const name of Object.keys(VIEWS)) this.draw(name); }

  draw(name) {
    const canvas = this.canvases[name], slice = this.slices[name];
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!slice) return;
    const v = VIEWS[name], [nA, nB] = slice.labels.shape; // slice array axes: the two non-fixed axes, ascending
    const cols = this.info.shape[v.col], rows = this.info.shape[v.row];
    const image = new ImageData(cols, rows);
    const low = this.window.level - this.window.width / 2, scale = 255 / this.window.width;
    for (let r = 0; r < rows; r++) {
      for (let c = 0; c < cols; c++) {
        const i = (cols - 1 - c) * nB + (rows - 1 - r); // v.col < v.row in every view: [col index][row index]
        const label = slice.labels.data[i];
        let grey = slice.ct ? Math.max(0, Math.min(255, (slice.ct.data[i] - low) * scale)) : (label ? 40 : 0);
        let rgb = [grey, grey, grey];
        const colour = label && (slice.ct ? label !== 200 : true) ? this.colours.get(label) : null;
        if (colour) {
          const a = slice.ct ? this.overlay : Math.max(this.overlay, 0.15) + 0.4;
          rgb = rgb.map((g, k) => g * (1 - a) + colour[k] * a);
        }
        const o = 4 * (r * cols + c);
        image.data[o] = rgb[0]; image.data[o + 1] = rgb[1]; image.data[o + 2] = rgb[2]; image.data[o + 3] = 255;
      }
    }
    // Physical proportions: one mm-per-pixel scale inside the canvas for both directions.
    const colMm = this.info.spacing[v.col], rowMm = this.info.spacing[v.row];
    const fit = Math.min(canvas.width / (cols * colMm), canvas.height / (rows * rowMm));
    const t = { cols, rows, colPx: colMm * fit, rowPx: rowMm * fit };
    t.left = (canvas.width - cols * t.colPx) / 2;
    t.top = (canvas.height - rows * t.rowPx) / 2;
    this.transforms[name] = t;
    const tile = document.createElement("canvas");
    tile.width = cols; tile.height = rows;
    tile.getContext("2d").putImageData(image, 0, 0);
    ctx.imageSmoothingEnabled = false;
    ctx.drawImage(tile, t.left, t.top, cols * t.colPx, rows * t.rowPx);
    this.drawCrosshair(ctx, name, t);
    canvas.dataset.index = String(slice.index);
    canvas.dataset.ready = "1";
  }

  drawCrosshair(ctx, name, t) {
    const p = this.canvasPoint(name, this.cursor);
    ctx.strokeStyle = "rgba(255, 220, 60, 0.7)";
    ctx.lineWidth = 1;
    ctx.beginPath();
    ctx.moveTo(t.left, p.y); ctx.lineTo(t.left + t.cols * t.colPx, p.y);
    ctx.moveTo(p.x, t.top); ctx.lineTo(p.x, t.top + t.rows * t.rowPx);
    ctx.stroke();
  }
}
